"""Small fixtures shared by the tests: random images, tiny mp4 files, tiny model configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_MODELS = ["tiny_qwen2vl", "tiny_llava_ov", "tiny_vila"]


def model_cfg(name: str, **overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def random_image(seed: int, height: int = 112, width: int = 112) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def write_video(path: Path, num_frames: int = 6, height: int = 56, width: int = 56, seed: int = 0) -> Path:
    """A tiny H.264 mp4 of random frames written with PyAV."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
