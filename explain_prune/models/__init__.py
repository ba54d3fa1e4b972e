"""Model adapters: `build_vlm(model_cfg)` returns the family's `VLM` (see models/base.py)."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from explain_prune.core import InputError, Sample
from explain_prune.models.base import VLM, DecoderParts, VisualPrompt, resolve_device, torch_dtype

# family name -> "module:Class"; modules are imported lazily so `import explain_prune` stays cheap.
FAMILIES = {
    "qwen2vl": "explain_prune.models.qwen2vl:Qwen2VL",
    "llava_onevision": "explain_prune.models.llava_onevision:LlavaOneVision",
    "vila": "explain_prune.models.vila:Vila",
}


def build_vlm(model_cfg: Mapping[str, Any], modality: Mapping[str, Any] | None = None) -> VLM:
    """Build the adapter named by `model_cfg.family` from a real checkpoint (`pretrained`) or, when
    `pretrained` is null, from the tiny random-weight config in `model_cfg.tiny`.

    `modality` (conf/modality/*.yaml) may override the frame budget for videos.  The model is placed
    on `model_cfg.device` in `model_cfg.dtype` (both `auto` by default: cuda + bfloat16 when there is
    a GPU, else cpu + float32).
    """
    family = model_cfg.get("family")
    if family not in FAMILIES:
        raise InputError(
            f"model {model_cfg.get('name', '?')!r}: unknown family {family!r} (known: {', '.join(sorted(FAMILIES))})"
        )
    device = resolve_device(model_cfg.get("device", "auto"))
    dtype = torch_dtype(str(model_cfg.get("dtype", "auto")), device)
    placed = {**model_cfg, "dtype": str(dtype).removeprefix("torch.")}  # the families read a concrete dtype
    module_name, class_name = FAMILIES[family].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_config(placed, modality=modality).to(device)


__all__ = ["build_vlm", "DecoderParts", "InputError", "Sample", "VisualPrompt", "VLM", "FAMILIES"]
