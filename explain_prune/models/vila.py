"""VILA1.5 (Llama-3-VILA1.5-8B) built in-project from transformers parts.

transformers has no VILA class, and NVlabs/VILA pins transformers 4.36, so the model is assembled
here from `SiglipVisionModel` (vision tower), VILA's `mlp_downsample` projector and
`LlamaForCausalLM`, and loaded from the ORIGINAL checkpoint folder layout:

    <root>/config.json          architectures ["LlavaLlamaModel"], model_type "llava_llama",
                                mm_vision_select_layer, mm_vision_select_feature, image_aspect_ratio,
                                num_video_frames, llm_cfg / vision_tower_cfg / mm_projector_cfg, ...
    <root>/llm/                 HF Llama folder (config, safetensors, tokenizer)
    <root>/vision_tower/        HF SigLIP vision folder + preprocessor_config.json
    <root>/mm_projector/        config.json (mm_projector_type "mlp_downsample") + safetensors with
                                VILA's parameter names layers.{1,2,4}.{weight,bias}

Facts reproduced from the NVlabs/VILA sources (see the module functions for each):
- VILA1.5-8B was trained with google/siglip-so400m-patch14-384, mm_vision_select_feature
  "cls_patch", mm_vision_select_layer -2, mm_projector mlp_downsample, image_aspect_ratio "resize"
  and the llama_3 template (scripts/v1_5/release/8b/1_mm_align.sh, 3_sft.sh).
- features = vision_tower(pixels, output_hidden_states=True).hidden_states[mm_vision_select_layer]
  (-2 = output of the penultimate encoder layer); "cls_patch" keeps every token, "patch" drops the
  first (llava/model/multimodal_encoder/vision_encoder.py, VisionTower.feature_select).
- projector = Sequential(DownSampleBlock, LayerNorm(4C), Linear(4C, D), GELU, Linear(D, D))
  (llava/model/multimodal_projector/base_projector.py).  DownSampleBlock zero-pads the 27x27 grid to
  28x28 (one row and one column at the end) and concatenates each 2x2 neighbourhood into channels in
  the order (r, c), (r, c+1), (r+1, c), (r+1, c+1).  Its view/permute makes the OUTPUT token order
  column-pair-major: token k of an image covers grid rows 2*(k % 14) .. +1 and columns
  2*(k // 14) .. +1.  Prompts therefore carry meta["visual_token_order"] = "column_major".
- images: "resize" aspect ratio = PIL resize to the processor size (384x384, bicubic), then SigLIP
  rescale 1/255 and normalise with mean = std = 0.5; "pad" = expand to a square filled with the mean
  colour, then the processor's resize (llava/mm_utils.py, process_image).
- prompt: llama_3 conversation template (llava/conversation.py, llama_3_chat), one "<image>\\n" per
  image or video frame before the question (llava/eval/run_vila.py; BasicImageEncoder /
  BasicVideoEncoder append "\\n" after each image / frame), tokenised chunk by chunk around "<image>"
  as llava/mm_utils.py tokenizer_image_token does (the checkpoint's tokenizer decides whether a BOS is
  added in front of the literal "<|begin_of_text|>"; only the first chunk keeps it).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from explain_prune.core import InputError, Sample, load_image
from explain_prune.models.base import (
    VLM,
    DecoderParts,
    VisualPrompt,
    instruction_positions,
    load_frames,
    torch_dtype,
)
from explain_prune.models.tiny import build_tokenizer
from explain_prune.models.vision_attention import siglip_token_stats

# llava/conversation.py, llama_3_chat (sep "<|eot_id|>"; the system text is VILA's, verbatim).
SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
SEP = "<|eot_id|>"
USER_ROLE = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT_ROLE = "<|start_header_id|>assistant<|end_header_id|>\n\n"
ASSISTANT_OPEN = SEP + ASSISTANT_ROLE  # closes the user turn, opens the answer
IMAGE_TOKEN = "<image>"
# Placeholder ids written at visual positions of `input_ids` (their embeddings are replaced).  The
# Llama-3 vocabulary has no "<image>" token; VILA itself uses the out-of-vocabulary id -200 there,
# which would break any decode of the prompt, so a reserved special token stands in.
PLACEHOLDER_CANDIDATES = ("<image>", "<|reserved_special_token_0|>")

SUBFOLDERS = ("llm", "vision_tower", "mm_projector")
SUPPORTED_ASPECT_RATIOS = ("resize", "pad")


# --------------------------------------------------------------------------------------------------
# Projector
# --------------------------------------------------------------------------------------------------
class DownSample2x2(nn.Module):
    """VILA's DownSampleBlock: [B, s*s, C] -> [B, ceil(s/2)^2, 4C].

    Odd grids get one zero row and one zero column appended (27 -> 28).  Channel order inside a
    merged token is (r, c), (r, c+1), (r+1, c), (r+1, c+1); merged tokens are ordered column-pair
    major (index = col_pair * m + row_pair), exactly as VILA's view/permute produces them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        s = math.isqrt(n)
        if s * s != n:
            raise ValueError(f"mlp_downsample needs a square token grid, got {n} tokens")
        pad = s % 2
        grid = F.pad(x.reshape(b, s, s, c), (0, 0, 0, pad, 0, pad))  # [b, row, col, c], padded at the end
        m = (s + pad) // 2
        grid = grid.view(b, m, 2, m, 2, c)  # [b, row_pair, dr, col_pair, dc, c]
        return grid.permute(0, 3, 1, 2, 4, 5).reshape(b, m * m, 4 * c)


class MlpDownsampleProjector(nn.Module):
    """`mm_projector_type: mlp_downsample`; parameter names match VILA's MultimodalProjector
    (`layers.1` LayerNorm, `layers.2` / `layers.4` Linear)."""

    projector_type = "mlp_downsample"

    def __init__(self, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.mm_hidden_size, self.hidden_size = int(mm_hidden_size), int(hidden_size)
        self.layers = nn.Sequential(
            DownSample2x2(),
            nn.LayerNorm(4 * self.mm_hidden_size),
            nn.Linear(4 * self.mm_hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, self.hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# --------------------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------------------
class VilaImageProcessor:
    """VILA's `process_image` for a SigLIP tower: aspect-ratio handling, then the SigLIP processor
    (resize to `size`, rescale, normalise).  Returns float32 [N, 3, H, W]."""

    def __init__(
        self,
        height: int = 384,
        width: int = 384,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        resample: int = int(Image.Resampling.BICUBIC),
        aspect_ratio: str = "resize",
    ):
        if aspect_ratio not in SUPPORTED_ASPECT_RATIOS:
            raise InputError(
                f"image_aspect_ratio {aspect_ratio!r} is not supported (known: {', '.join(SUPPORTED_ASPECT_RATIOS)})"
            )
        self.height, self.width = int(height), int(width)
        self.image_mean = np.asarray(image_mean, dtype=np.float64)
        self.image_std = np.asarray(image_std, dtype=np.float64)
        self.rescale_factor = float(rescale_factor)
        self.resample = Image.Resampling(int(resample))
        self.aspect_ratio = aspect_ratio

    @classmethod
    def from_json(cls, path: Path, aspect_ratio: str) -> "VilaImageProcessor":
        if not path.is_file():
            raise InputError(f"vision tower preprocessor config not found: {path}")
        cfg = json.loads(path.read_text())
        size = cfg.get("size", {})
        if "height" not in size or "width" not in size:
            raise InputError(f"{path}: expected size {{height, width}}, got {size}")
        return cls(
            height=size["height"],
            width=size["width"],
            image_mean=cfg.get("image_mean", (0.5, 0.5, 0.5)),
            image_std=cfg.get("image_std", (0.5, 0.5, 0.5)),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
            resample=cfg.get("resample", int(Image.Resampling.BICUBIC)),
            aspect_ratio=aspect_ratio,
        )

    def to_json(self) -> dict[str, Any]:
        """The SigLIP `preprocessor_config.json` of the vision tower folder."""
        return {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": self.image_mean.tolist(),
            "image_std": self.image_std.tolist(),
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "SiglipProcessor",
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.height, "width": self.width},
        }

    def _one(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        size = (self.width, self.height)
        if self.aspect_ratio == "resize":
            # VILA: image.resize((w, h)) with PIL's default filter (bicubic for RGB)
            image = image.resize(size, Image.Resampling.BICUBIC)
        else:  # "pad": expand2square with the mean colour, then the processor's resize
            w, h = image.size
            if w != h:
                side = max(w, h)
                fill = tuple(int(m * 255) for m in self.image_mean)
                canvas = Image.new("RGB", (side, side), fill)
                canvas.paste(image, ((side - w) // 2, (side - h) // 2))
                image = canvas
        if image.size != size:
            image = image.resize(size, self.resample)
        arr = np.asarray(image, dtype=np.float64) * self.rescale_factor
        arr = (arr - self.image_mean) / self.image_std
        return arr.transpose(2, 0, 1).astype(np.float32)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._one(img) for img in images]))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class VilaForConditionalGeneration(nn.Module):
    """Vision tower -> mm projector -> Llama.  `generate`/`forward` take `inputs_embeds` (built by
    `embed`) and are the Llama's own, so `VLM.generate_reference` works unchanged."""

    def __init__(
        self,
        llm: LlamaForCausalLM,
        vision_tower: SiglipVisionModel,
        mm_projector: MlpDownsampleProjector,
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "cls_patch",
    ):
        super().__init__()
        self.llm = llm  # registered first: VLM.dtype / device read the first parameter
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        if mm_vision_select_feature not in ("patch", "cls_patch"):
            raise InputError(f"unknown mm_vision_select_feature {mm_vision_select_feature!r} (known: patch, cls_patch)")
        self.mm_vision_select_layer = int(mm_vision_select_layer)
        self.mm_vision_select_feature = mm_vision_select_feature
        vcfg = vision_tower.config
        n = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2 - (1 if mm_vision_select_feature == "patch" else 0)
        if math.isqrt(n) ** 2 != n:
            raise InputError(
                f"mm_vision_select_feature={mm_vision_select_feature!r} leaves {n} SigLIP tokens, not a square grid "
                "(SigLIP has no CLS token; VILA's SigLIP checkpoints use 'cls_patch')"
            )
        n_layers = int(vcfg.num_hidden_layers)
        if not -(n_layers + 1) <= self.mm_vision_select_layer <= n_layers:
            raise InputError(f"mm_vision_select_layer {mm_vision_select_layer} out of range for {n_layers} layers")
        self.vision_grid = math.isqrt(n)
        self.tokens_per_image = ((self.vision_grid + 1) // 2) ** 2

    # transformers-like surface used by VLM -------------------------------------------------------
    @property
    def config(self) -> LlamaConfig:
        return self.llm.config

    @property
    def generation_config(self):
        return self.llm.generation_config

    def forward(self, **kwargs: Any):
        return self.llm(**kwargs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.llm.generate(**kwargs)

    # vision path ----------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, P, C]: hidden_states[mm_vision_select_layer] (index 0 = embeddings)."""
        out = self.vision_tower(
            pixel_values.to(device=self.vision_tower.device, dtype=self.vision_tower.dtype), output_hidden_states=True
        )
        feats = out.hidden_states[self.mm_vision_select_layer]
        return feats[:, 1:] if self.mm_vision_select_feature == "patch" else feats

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, d_llm]."""
        return self.mm_projector(self.vision_features(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, placeholder_id: int) -> torch.Tensor:
        """Text embeddings with the images' projected features written, in order, at the positions
        holding `placeholder_id` ([1, L] -> [1, L, d])."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        feats = self.encode_images(pixel_values).to(embeds.dtype).reshape(-1, embeds.shape[-1])
        mask = input_ids == placeholder_id
        if int(mask.sum()) != feats.shape[0]:
            raise InputError(f"{feats.shape[0]} visual features for {int(mask.sum())} placeholder positions")
        embeds = embeds.clone()
        embeds[mask] = feats
        return embeds


# --------------------------------------------------------------------------------------------------
# Building: tiny random model, original checkpoint layout (load and save)
# --------------------------------------------------------------------------------------------------
def _token_id(tokenizer: Any, token: str) -> int | None:
    return tokenizer.get_vocab().get(token)


def placeholder_token_id(tokenizer: Any) -> int:
    for token in PLACEHOLDER_CANDIDATES:
        tid = _token_id(tokenizer, token)
        if tid is not None:
            return int(tid)
    raise InputError(f"tokenizer has none of the placeholder tokens {PLACEHOLDER_CANDIDATES}")


def tiny_tokenizer() -> Any:
    """The project's local word-level tokenizer with Llama-3 bos/eos (<|begin_of_text|>, <|eot_id|>)."""
    tokenizer = build_tokenizer()
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.eos_token = "<|eot_id|>"
    return tokenizer


def build_tiny(tiny: Mapping[str, Any], tokenizer: Any, dtype: torch.dtype, attn: str) -> VilaForConditionalGeneration:
    """A seeded random-weight VILA: tiny Llama + thin SigLIP (default 384/14 -> 27x27 -> 14x14)."""
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(tiny.get("vision", {}))
    init = float(tiny.get("initializer_range", 0.02))
    torch.manual_seed(int(tiny.get("seed", 0)))
    llm_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(tiny["hidden_size"]),
        intermediate_size=int(tiny["intermediate_size"]),
        num_hidden_layers=int(tiny["num_layers"]),
        num_attention_heads=int(tiny["num_heads"]),
        num_key_value_heads=int(tiny["num_kv_heads"]),
        max_position_embeddings=int(tiny.get("max_position_embeddings", 8192)),
        initializer_range=init,
        tie_word_embeddings=False,
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    llm_cfg._attn_implementation = attn
    llm = LlamaForCausalLM(llm_cfg)
    llm.generation_config.eos_token_id = ids("<|eot_id|>")
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.generation_config.bos_token_id = ids("<|begin_of_text|>")
    vision_cfg = SiglipVisionConfig(
        hidden_size=int(vision.get("hidden_size", 32)),
        intermediate_size=int(vision.get("intermediate_size", 64)),
        num_hidden_layers=int(vision.get("num_layers", 2)),
        num_attention_heads=int(vision.get("num_heads", 4)),
        image_size=int(vision.get("image_size", 384)),
        patch_size=int(vision.get("patch_size", 14)),
        vision_use_head=False,
    )
    vision_cfg._attn_implementation = "sdpa"
    tower = SiglipVisionModel(vision_cfg)
    projector = MlpDownsampleProjector(vision_cfg.hidden_size, llm_cfg.hidden_size)
    model = VilaForConditionalGeneration(
        llm,
        tower,
        projector,
        mm_vision_select_layer=int(tiny.get("mm_vision_select_layer", -2)),
        mm_vision_select_feature=str(tiny.get("mm_vision_select_feature", "cls_patch")),
    )
    return model.to(dtype).eval()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"VILA checkpoint file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"unreadable JSON {path}: {err}") from None


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
    return _read_json(root / "config.json")


def load_original(
    root: str | Path, dtype: torch.dtype, attn: str
) -> tuple[VilaForConditionalGeneration, Any, dict[str, Any]]:
    """Load <root>/{config.json, llm/, vision_tower/, mm_projector/} -> (model, tokenizer, top config)."""
    root = Path(root)
    top = check_layout(root)
    proj_cfg = _read_json(root / "mm_projector" / "config.json")
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


def save_original(vlm: "Vila", root: str | Path) -> Path:
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


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------
class Vila(VLM):
    family = "vila"

    def __init__(
        self,
        name: str,
        model: VilaForConditionalGeneration,
        tokenizer: Any,
        image_processor: VilaImageProcessor,
        num_frames: int,
        frame_sampling: str,
    ):
        super().__init__(name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_frames = int(num_frames)
        self.frame_sampling = frame_sampling
        self.placeholder_id = placeholder_token_id(tokenizer)
        self._newline_ids = self._encode("\n", first=False)
        self._suffix_len = len(tokenizer(ASSISTANT_OPEN, add_special_tokens=False)["input_ids"])

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], modality: Mapping[str, Any] | None = None) -> "Vila":
        dtype = torch_dtype(cfg.get("dtype", "float32"))
        attn = cfg.get("attn_implementation", "sdpa")
        image_cfg, video_cfg = cfg.get("image") or {}, cfg.get("video") or {}
        if cfg.get("trust_remote_code"):
            raise InputError(f"model {cfg.get('name')}: VILA is built in-project; trust_remote_code is not used")
        if cfg.get("pretrained"):
            model, tokenizer, top = load_original(str(cfg["pretrained"]), dtype, attn)
            aspect = image_cfg.get("aspect_ratio") or top.get("image_aspect_ratio") or "resize"
            image_processor = VilaImageProcessor.from_json(
                Path(str(cfg["pretrained"])) / "vision_tower" / "preprocessor_config.json", aspect
            )
            default_frames = top.get("num_video_frames") or 8
        else:
            tiny = cfg.get("tiny")
            if not tiny:
                raise InputError(f"model {cfg.get('name')}: pretrained is null and there is no `tiny` config")
            tokenizer = tiny_tokenizer()
            model = build_tiny(tiny, tokenizer, dtype, attn)
            size = int(model.vision_tower.config.image_size)
            image_processor = VilaImageProcessor(size, size, aspect_ratio=image_cfg.get("aspect_ratio") or "resize")
            default_frames = 8
        modality = modality or {}
        return cls(
            name=str(cfg.get("name", "vila")),
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            num_frames=int(modality.get("num_frames") or video_cfg.get("num_frames") or default_frames),
            frame_sampling=str(modality.get("sampling") or video_cfg.get("sampling", "linspace")),
        )

    # --- prompt ---------------------------------------------------------------------------------------
    @staticmethod
    def prompt_text(question: str, num_images: int) -> str:
        """llama_3 conversation text with one "<image>\\n" per image/frame, ending at the answer."""
        return SYSTEM + SEP + USER_ROLE + (IMAGE_TOKEN + "\n") * num_images + question + ASSISTANT_OPEN

    def _encode(self, chunk: str, first: bool) -> list[int]:
        """One text chunk as tokenizer_image_token tokenises it: with the tokenizer's special tokens,
        a leading BOS kept only on the first chunk."""
        ids = list(self.tokenizer(chunk)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if not first and ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        return ids

    def tokenize(self, text: str, tokens_per_image: int) -> torch.Tensor:
        """[1, L] ids; every "<image>" becomes `tokens_per_image` placeholder ids."""
        chunks = text.split(IMAGE_TOKEN)
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i:
                ids.extend([self.placeholder_id] * tokens_per_image)
            ids.extend(self._encode(chunk, first=i == 0))
        return torch.tensor([ids], dtype=torch.long)

    # --- the contract ---------------------------------------------------------------------------------
    def prepare(self, sample: Sample) -> VisualPrompt:
        # VILA removes media tokens typed into the text (llava/utils/media.py, extract_media)
        question = (sample.question or "").replace(IMAGE_TOKEN, "").strip()
        if not question:
            raise InputError(f"sample {sample.id!r}: empty question")
        if sample.video is not None:
            images = load_frames(sample, self.num_frames, self.frame_sampling)
        elif sample.images:
            images = [load_image(img) for img in sample.images]
        else:
            raise InputError(f"sample {sample.id!r}: no image or video (VILA needs a visual input)")

        pixels = self.image_processor(images)
        per_image = self.model.tokens_per_image
        input_ids = self.tokenize(self.prompt_text(question, len(images)), per_image).to(self.device)
        with torch.no_grad():
            embeds = self.model.embed(input_ids, pixels, self.placeholder_id)
        visual_index = (input_ids[0] == self.placeholder_id).nonzero().squeeze(-1).cpu()
        last = int(visual_index.max())
        nl = self._newline_ids
        follows = input_ids[0, last + 1 : last + 1 + len(nl)].tolist() == nl
        side = math.isqrt(per_image)
        return VisualPrompt(
            inputs_embeds=embeds,
            position_ids=torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0),
            attention_mask=torch.ones_like(input_ids),
            input_ids=input_ids,
            visual_index=visual_index,
            instruction_index=instruction_positions(
                input_ids, visual_index, self._suffix_len, skip=len(nl) if follows else 0
            ),
            visual_grid=(len(images), side, side),
            sample_id=sample.id,
            meta={
                "pixel_values": pixels,
                "modality": sample.modality,
                # token k of an image covers grid rows 2*(k % side) and columns 2*(k // side) (VILA's order)
                "visual_token_order": "column_major",
            },
        )

    @property
    def decoder(self) -> DecoderParts:
        llm = self.model.llm
        return DecoderParts(
            embed_tokens=llm.model.embed_tokens,
            layers=llm.model.layers,
            norm=llm.model.norm,
            lm_head=llm.lm_head,
            rotary_emb=llm.model.rotary_emb,
            config=llm.config,
        )

    @torch.no_grad()
    def vision_token_scores(self, prompt: VisualPrompt, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's statistics (methods/visionzip.py) at SigLIP layer `layer`: (attention each patch
        receives within its image / frame [N_v], head-mean keys [N_v, head_dim]) in `visual_index` order.

        Pooled like the projector pools features: VILA's own DownSample2x2 groups each 2x2
        neighbourhood (column-major token order); a token's statistics are the mean over the real
        patches of its group (the zero-padded row / column of an odd grid does not count).
        """
        pixels = prompt.meta.get("pixel_values")
        if pixels is None:
            raise InputError(f"sample {prompt.sample_id!r}: the prompt carries no pixel_values")
        model = self.model
        received, keys = siglip_token_stats(model.vision_tower, layer, functools.partial(model.vision_features, pixels))
        if model.mm_vision_select_feature == "patch":  # the features (and so the LLM tokens) skip the first token
            received, keys = received[:, 1:], keys[:, 1:]
        real = torch.ones_like(received)[..., None]
        stats = torch.cat([received[..., None], keys, real], -1)  # [images, s*s, 1 + hd + 1]
        groups = DownSample2x2()(stats)  # [images, m*m, 4 * (2 + hd)], VILA's token order
        groups = groups.view(*groups.shape[:2], 4, stats.shape[-1])  # the 4 neighbours of each token
        pooled = groups[..., :-1].sum(2) / groups[..., -1:].sum(2)  # mean over the real patches
        tokens = pooled.flatten(0, 1)
        if tokens.shape[0] != prompt.num_visual:
            raise InputError(f"sample {prompt.sample_id!r}: {tokens.shape[0]} vision statistics for {prompt.num_visual} visual tokens")
        return tokens[:, 0].cpu(), tokens[:, 1:].cpu()

    @property
    def eos_token_ids(self) -> list[int]:
        """The LM's eos ids plus <|eot_id|>, VILA's llama_3 stop string."""
        ids = super().eos_token_ids
        eot = _token_id(self.tokenizer, SEP)
        return ids + [int(eot)] if eot is not None and int(eot) not in ids else ids

    def visual_token_boxes(self, prompt: VisualPrompt, image_sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """[N_v, 7] (see VLM.visual_token_boxes).  Each image / frame becomes the tower's square (stretched
        under "resize"; under "pad" first centred on a square of its longer side, which needs
        `image_sizes`); token k reads the 2x2 patch group at row pair k % m, column pair k // m (VILA's
        column-major order).  The zero row / column padding an odd grid adds no pixels, and s patches of
        `patch_size` px may stop short of the edge (SigLIP 384/14: 378 px), so the last pixels feed no token."""
        vcfg = self.model.vision_tower.config
        s, patch, size = self.model.vision_grid, int(vcfg.patch_size), int(vcfg.image_size)
        pairs = torch.arange((s + 1) // 2, dtype=torch.float64)
        edges = torch.stack([2 * pairs, (2 * pairs + 2).clamp(max=s)], -1) * patch / size  # [m, 2], fractions of the square
        n_images = prompt.num_visual // self.model.tokens_per_image
        pad = self.image_processor.aspect_ratio == "pad"
        if pad and (image_sizes is None or len(image_sizes) != n_images):
            raise InputError(
                f"model {self.name}: with image_aspect_ratio='pad' the token boxes need image_sizes, (H, W) of each of "
                f"the {n_images} images / frames"
            )
        parts = []
        for i in range(n_images):
            ys = xs = edges
            if pad:
                height, width = image_sizes[i]
                side = max(height, width)
                ys, xs = (edges * side - (side - height) // 2) / height, (edges * side - (side - width) // 2) / width
            parts.append(self.grid_token_boxes(i, i + 1, 0, ys, xs, column_major=True))
        return torch.cat(parts)
