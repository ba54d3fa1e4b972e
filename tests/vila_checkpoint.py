"""Test-only writer of a VILA checkpoint in the ORIGINAL NVlabs layout, so the loader
(`explain_prune.models.vila.conversion_vila.load_original`) can be tested without the 8B weights."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from explain_prune.models.vila import (
    MlpDownsampleProjector,
    Vila,
    VilaForConditionalGeneration,
)
from explain_prune.models.vila.conversion_vila import SUBFOLDERS


def save_original(vlm: Vila, root: str | Path) -> Path:
    """Write `vlm` in VILA's original layout (safetensors only).  Used to test the loader."""
    root = Path(root)
    model: VilaForConditionalGeneration = vlm.model
    for name in SUBFOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(str(root / "llm"))
    vlm.tokenizer.save_pretrained(str(root / "llm"))
    # VILA's checkpoints were written by transformers 4.x, whose SigLIP keys carry "vision_model.".
    tower = model.vision_tower
    tower.config.save_pretrained(str(root / "vision_tower"))
    save_file(
        {f"vision_model.{k}": v.detach().contiguous() for k, v in tower.state_dict().items()},
        str(root / "vision_tower" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (root / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(vlm.image_processor.to_json(), indent=2))
    dtype_name = str(vlm.dtype)
    proj_cfg = {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": MlpDownsampleProjector.projector_type,
        "model_type": "v2l_projector",
        "torch_dtype": dtype_name.replace("torch.", ""),
    }
    (root / "mm_projector" / "config.json").write_text(json.dumps(proj_cfg, indent=2))
    save_file(
        {k: v.detach().contiguous() for k, v in model.mm_projector.state_dict().items()},
        str(root / "mm_projector" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": model.llm.config.to_dict(),
        "vision_tower_cfg": tower.config.to_dict(),
        "mm_projector_cfg": proj_cfg,
        "hidden_size": int(model.llm.config.hidden_size),
        "mm_hidden_size": int(tower.config.hidden_size),
        "image_aspect_ratio": vlm.image_processor.aspect_ratio,
        "num_video_frames": int(vlm.num_frames),
        "mm_vision_select_layer": model.mm_vision_select_layer,
        "mm_vision_select_feature": model.mm_vision_select_feature,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "model_dtype": dtype_name,
        "resume_path": str(root),
    }
    (root / "config.json").write_text(json.dumps(top, indent=2))
    return root
