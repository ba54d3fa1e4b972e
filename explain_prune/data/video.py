"""Video frames for the adapters: decord reader with an explicit, pinned sampling rule.

Frame sampling conventions differ between harnesses and change scores, so the rule is a named
argument: "linspace" (both endpoints, lmms-eval / qwen-vl-utils), "interior" (VLMEvalKit
Video-MME: i*T/(n+1), i=1..n) and "centers" (segment centres, VLMEvalKit MVBench).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from explain_prune.models.base import InputError

SAMPLING_RULES = ("linspace", "interior", "centers")


def frame_indices(total: int, num_frames: int, rule: str = "linspace") -> list[int]:
    """Indices of `num_frames` frames out of `total` under `rule` (repeats allowed if total < n)."""
    if total <= 0:
        raise InputError("video has no frames")
    if rule == "linspace":
        idx = np.linspace(0, total - 1, num_frames).round()
    elif rule == "interior":
        idx = np.array([int(i * total / (num_frames + 1)) for i in range(1, num_frames + 1)])
    elif rule == "centers":
        seg = total / num_frames
        idx = np.array([int(seg / 2 + seg * i) for i in range(num_frames)])
    else:
        raise InputError(f"unknown frame sampling rule {rule!r} (known: {', '.join(SAMPLING_RULES)})")
    return [int(min(max(i, 0), total - 1)) for i in idx]


def read_frames(path: str | Path, num_frames: int, rule: str = "linspace") -> list[Image.Image]:
    """Decode `num_frames` RGB frames from a video file with decord."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    import decord  # imported lazily: decord is slow to import and optional for image-only use

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        total = len(reader)
        batch = reader.get_batch(frame_indices(total, num_frames, rule)).asnumpy()
    except InputError:
        raise
    except Exception as err:  # decord raises DECORDError / RuntimeError on corrupt files
        raise InputError(f"unreadable video {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    finally:
        reader = None  # release the file handle (decord leaks otherwise)
    return [Image.fromarray(frame) for frame in batch]
