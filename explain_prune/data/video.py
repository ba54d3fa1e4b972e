"""Video frames for the adapters: decord reader with an explicit, pinned sampling rule.

Frame sampling conventions differ between harnesses and change scores, so the rule is a named
argument, each reproducing one reference implementation exactly (floating-point order included):

* "linspace" — `round(linspace(s, e, n))`, both ends included (qwen-vl-utils `fetch_video`;
  lmms-eval's Qwen2-VL path);
* "interior" — `s + int(i * step)`, `step = (e - s + 1) / (n + 1)`, i = 1..n (VLMEvalKit
  `VideoBaseDataset.save_video_frames`, used by its Video-MME and MMBench-Video frame paths);
* "centers" — `int(s + seg/2 + round(seg * i))`, `seg = (e - s) / n`, i = 0..n-1 (VLMEvalKit
  `MVBench.get_index`).

[s, e] is the inclusive frame range: the whole video, or — with clip bounds (start, end) in seconds,
as MVBench's bound tasks carry — `s = max(first, round(start * fps))`, `e = min(round(end * fps),
last)` with the video's average fps (VLMEvalKit `get_index`). For the whole video VLMEvalKit passes
the bound (-100000 s, 100000 s), which gives the same range for any video shorter than 27 hours.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from explain_prune.core import InputError

SAMPLING_RULES = ("linspace", "interior", "centers")


def frame_range(
    total: int, fps: float | None = None, bound: tuple[float, float] | None = None, first_idx: int = 0
) -> tuple[int, int]:
    """Inclusive [s, e] of the frames numbered first_idx .. first_idx + total - 1 that lie inside
    `bound` (start, end) seconds at `fps` (all of them without a bound)."""
    if total <= 0:
        raise InputError("video has no frames")
    last = first_idx + total - 1
    if bound is None:
        return first_idx, last
    if fps is None or not fps > 0:
        raise InputError(f"clip bounds {bound} need the video's frame rate, got fps={fps}")
    start_idx = max(first_idx, round(bound[0] * fps))
    end_idx = min(round(bound[1] * fps), last)
    if end_idx < start_idx:
        raise InputError(
            f"clip [{bound[0]}, {bound[1]}] s holds no frame of a {total}-frame video at {fps:g} fps"
        )
    return start_idx, end_idx


def frame_indices(
    total: int,
    num_frames: int,
    rule: str = "linspace",
    fps: float | None = None,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """Indices of `num_frames` frames under `rule` within `frame_range(...)` (repeats when the
    range is shorter than num_frames)."""
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    s, e = frame_range(total, fps, bound, first_idx)
    if rule == "linspace":
        return [int(i) for i in np.linspace(s, e, num_frames).round()]
    if rule == "interior":
        step = (e - s + 1) / (num_frames + 1)
        return [s + int(i * step) for i in range(1, num_frames + 1)]
    if rule == "centers":
        seg = float(e - s) / num_frames
        return [int(s + seg / 2 + np.round(seg * i)) for i in range(num_frames)]
    raise InputError(f"unknown frame sampling rule {rule!r} (known: {', '.join(SAMPLING_RULES)})")


def clip_bound(meta: Mapping[str, Any]) -> tuple[float, float] | None:
    """(start, end) seconds from a sample's meta ("start"/"end"), None when it has neither."""
    start, end = meta.get("start"), meta.get("end")
    if start is None and end is None:
        return None
    try:
        bound = float(start), float(end)
    except (TypeError, ValueError):
        raise InputError(f"clip bounds need numeric start and end seconds, got start={start!r} end={end!r}") from None
    if not all(math.isfinite(b) for b in bound) or not bound[1] > bound[0]:
        raise InputError(f"clip bounds must be finite with end > start, got start={start!r} end={end!r}")
    return bound


def read_frames(
    path: str | Path, num_frames: int, rule: str = "linspace", bound: tuple[float, float] | None = None
) -> list[Image.Image]:
    """Decode `num_frames` RGB frames from a video file with decord (within `bound` seconds if given)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    import decord  # imported lazily: decord is slow to import and optional for image-only use

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        fps = float(reader.get_avg_fps()) if bound is not None else None
        frames = []
        for index in frame_indices(len(reader), num_frames, rule, fps, bound):
            # one accurate seek per sampled frame: the same pixels as get_batch, 0.88x its time on 32 of 240
            # 720p frames (scripts/bench_prefetch.py), and no batch array to copy
            reader.seek_accurate(index)
            frames.append(Image.fromarray(reader.next().asnumpy()))
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    except Exception as err:  # decord raises DECORDError / RuntimeError on corrupt files
        raise InputError(f"unreadable video {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    finally:
        reader = None  # release the file handle (decord leaks otherwise)
    return frames


def read_sample_frames(
    path: str | Path, num_frames: int, meta: Mapping[str, Any], default_rule: str = "linspace"
) -> list[Image.Image]:
    """The adapters' frame reader: the benchmark's pinned rule (`meta["frame_sampling"]`, else the
    model's `default_rule`) inside the sample's clip bounds (`meta["start"]`, `meta["end"]`, seconds)."""
    return read_frames(path, num_frames, meta.get("frame_sampling") or default_rule, clip_bound(meta))
