"""VILA's image preprocessing for a SigLIP tower (llava/mm_utils.py, process_image).

"resize" aspect ratio = PIL resize to the processor size (384x384, bicubic), then SigLIP rescale
1/255 and normalise with mean = std = 0.5; "pad" = expand to a square filled with the mean colour,
then the processor's resize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from explain_prune.core import InputError, read_json

SUPPORTED_ASPECT_RATIOS = ("resize", "pad")


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
        """From the vision tower's SigLIP `preprocessor_config.json`; the aspect ratio is VILA's own setting."""
        cfg = read_json(path, "vision tower preprocessor config")
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
        """One image -> float32 [3, H, W]."""
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
        arr = np.asarray(image, dtype=np.float64) * self.rescale_factor  # [H, W, 3]
        arr = (arr - self.image_mean) / self.image_std
        return arr.transpose(2, 0, 1).astype(np.float32)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._one(img) for img in images]))
