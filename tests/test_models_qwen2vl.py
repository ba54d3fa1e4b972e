"""Qwen2-VL's video budget follows qwen-vl-utils: frames are resized by its smart_resize with
VIDEO_MIN_PIXELS = 128·28·28, so small frames are upscaled (the image budget's 56·56 would not)."""

from __future__ import annotations

import math

from helpers import model_cfg, write_video

from explain_prune.models import Sample, build_vlm


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """qwen-vl-utils' rule, written from its definition: round to the factor, then scale into [min, max]."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def test_small_video_frames_are_upscaled_to_qwen_vl_utils_minimum(tmp_path):
    video = write_video(tmp_path / "small.mp4", num_frames=8, height=240, width=320)
    cfg = model_cfg("tiny_qwen2vl", **{"video.num_frames": 8, "video.max_pixels": 254016})
    del cfg.video["min_pixels"]  # the default: qwen-vl-utils' VIDEO_MIN_PIXELS
    prompt = build_vlm(cfg).prepare(Sample(id="v", question="What happens ?", video=str(video)))
    h, w = smart_resize(240, 320, 128 * 28 * 28, 254016)
    assert (h, w) == (280, 392)
    assert prompt.num_visual == (8 // 2) * (h // 28) * (w // 28) == 560
    assert prompt.visual_grid == (4, h // 28, w // 28)
