"""Loading VILA from its ORIGINAL checkpoint folder layout (as NVlabs/VILA writes it):

    <root>/config.json          architectures ["LlavaLlamaModel"], model_type "llava_llama",
                                mm_vision_select_layer, mm_vision_select_feature, image_aspect_ratio,
                                num_video_frames, llm_cfg / vision_tower_cfg / mm_projector_cfg, ...
    <root>/llm/                 HF Llama folder (config, safetensors, tokenizer)
    <root>/vision_tower/        HF SigLIP vision folder + preprocessor_config.json
    <root>/mm_projector/        config.json (mm_projector_type "mlp_downsample") + safetensors with
                                VILA's parameter names layers.{1,2,4}.{weight,bias}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, SiglipVisionModel

from explain_prune.core import InputError, read_json
from explain_prune.models.vila.modeling_vila import (
    MlpDownsampleProjector,
    VilaForConditionalGeneration,
)

SUBFOLDERS = ("llm", "vision_tower", "mm_projector")


def _safetensors_state(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"no .safetensors weights in {folder} (pickle .bin checkpoints are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def check_layout(root: Path) -> dict[str, Any]:
    """Validate the original folder layout; returns the top-level config.  InputError names what is missing."""
    if not root.is_dir():
        raise InputError(f"VILA checkpoint folder not found: {root}")
    missing = [name for name in SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise InputError(f"VILA checkpoint {root} lacks sub-folder(s): {', '.join(missing)}")
    return read_json(root / "config.json", "VILA checkpoint file")


def load_original(
    root: str | Path, dtype: torch.dtype, attn: str
) -> tuple[VilaForConditionalGeneration, Any, dict[str, Any]]:
    """Load <root>/{config.json, llm/, vision_tower/, mm_projector/} -> (model, tokenizer, top config)."""
    root = Path(root)
    top = check_layout(root)
    proj_cfg = read_json(root / "mm_projector" / "config.json", "VILA checkpoint file")
    ptype = proj_cfg.get("mm_projector_type")
    if ptype != MlpDownsampleProjector.projector_type:
        raise InputError(f"{root / 'mm_projector'}: mm_projector_type {ptype!r} is not supported (only 'mlp_downsample')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root / "llm"))
        llm = LlamaForCausalLM.from_pretrained(str(root / "llm"), dtype=dtype, attn_implementation=attn)
        tower = SiglipVisionModel.from_pretrained(str(root / "vision_tower"), dtype=dtype)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load VILA checkpoint {root}: {str(err).splitlines()[0]}") from None
    projector = MlpDownsampleProjector(tower.config.hidden_size, llm.config.hidden_size)
    state = _safetensors_state(root / "mm_projector")
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{root / 'mm_projector'}: weights do not fit mlp_downsample: {str(err).splitlines()[0]}") from None
    model = VilaForConditionalGeneration(
        llm,
        tower,
        projector.to(dtype),
        mm_vision_select_layer=int(top.get("mm_vision_select_layer", -2)),
        mm_vision_select_feature=str(top.get("mm_vision_select_feature") or "patch"),
    )
    return model.eval(), tokenizer, top
