"""Benchmark: a 32-frame 720p video evaluate with 0 vs N loader workers, and decord's frame reads.

Writes (once, reused) a Video-MME-layout fixture of `--videos` 10 s 1280x720 H.264 clips with moving
texture, then runs `stages.evaluate.evaluate` on it with the tiny Qwen2-VL model at Qwen2-VL-7B's real
video budget (conf/model/qwen2vl.yaml: max_pixels 254 016, 32 frames), the model stage pinned to
`--threads` threads, in-process and with `--workers` workers (rounds interleaved).  Prints samples/s,
the speed-up (target >= 1.6x with 2 workers) and the split of the loop into waiting on preparation,
the model (encode + generate) and bookkeeping.  Then times decoding 32 frames of one clip with
decord's `get_batch` (what `data.video.read_frames` does) against one seek + read per frame.

    python scripts/bench_prefetch.py [--videos 8] [--rounds 2] [--workers 2] [--threads 1] [--fixture DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_evaluate import summarize, timed_job  # noqa: E402

from explain_prune.benchmarks import build_benchmark  # noqa: E402
from explain_prune.data.video import frame_indices  # noqa: E402
from explain_prune.methods import build_method  # noqa: E402
from explain_prune.models import build_vlm  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS, FRAMES = 1280, 720, 24, 10, 32


def write_clip(path: Path, seed: int, width: int = WIDTH, height: int = HEIGHT, seconds: int = SECONDS) -> None:
    """H.264 (720p, 10 s by default): a blocky random texture drifting across the frame, with per-frame noise."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8, width // 8 + seconds * FPS, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(seconds * FPS):
            frame = base[:, i * 8 % (base.shape[1] - width):][:, :width]
            noisy = np.clip(frame.astype(np.int16) + rng.integers(-8, 9, frame.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(noisy, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_fixture(root: Path, videos: int, **size: int) -> Path:
    """Video-MME's released layout (videomme/test-*.parquet + data/<videoID>.mp4), one question per clip
    (`size`: write_clip's width / height / seconds)."""
    import pandas as pd

    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "videomme").mkdir(exist_ok=True)
    rows = []
    for i in range(videos):
        clip = root / "data" / f"clip{i:03d}.mp4"
        if not clip.is_file():
            write_clip(clip, i, **size)
        rows.append(dict(video_id=f"{i:03d}", duration="short", domain="Knowledge", sub_category="Astronomy",
                         url=f"https://x/clip{i:03d}", videoID=f"clip{i:03d}", question_id=f"{i:03d}-1",
                         task_type="Counting Problem", question="How many stars are there?",
                         options=np.array([f"{k}. option {k.lower()}" for k in "ABCD"], dtype=object), answer="ABCD"[i % 4]))
    pd.DataFrame(rows).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    return root


def decode_times(clip: Path, rounds: int) -> tuple[float, float, bool]:
    """Median seconds to decode FRAMES linspace frames with get_batch vs one seek + next() per frame."""
    import decord

    batch_s, seek_s, same = [], [], True
    for _ in range(rounds):
        reader = decord.VideoReader(str(clip), num_threads=1)
        indices = frame_indices(len(reader), FRAMES, "linspace")
        start = time.perf_counter()
        batch = reader.get_batch(indices).asnumpy()
        batch_s.append(time.perf_counter() - start)
        reader = decord.VideoReader(str(clip), num_threads=1)
        start = time.perf_counter()
        frames = []
        for index in indices:
            reader.seek_accurate(index)
            frames.append(reader.next().asnumpy())
        seek_s.append(time.perf_counter() - start)
        same = same and bool(np.array_equal(np.stack(frames), batch))
    return statistics.median(batch_s), statistics.median(seek_s), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model stage")
    parser.add_argument("--fixture", type=Path, default=Path(tempfile.gettempdir()) / "explain_prune_bench_videos")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = write_fixture(args.fixture, args.videos)
    print(f"fixture: {args.videos} clips of {SECONDS} s {WIDTH}x{HEIGHT} H.264 at {FPS} fps in {root} "
          f"({time.perf_counter() - start:.1f} s to write or find)")

    budget = OmegaConf.load(ROOT / "conf" / "model" / "qwen2vl.yaml").video
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "model" / "tiny_qwen2vl.yaml"),
                          {"device": "cpu", "video": {**OmegaConf.to_container(budget), "num_frames": FRAMES}})
    vlm = build_vlm(cfg)
    dims = OmegaConf.to_container(cfg.llm, resolve=True)
    method = build_method("vanilla", 1.0)

    def bench():
        return build_benchmark(name="videomme", root=str(root))

    arms = {"in-process": 0, f"{args.workers} workers": args.workers}
    timed_job(vlm, bench(), method, dims, 1, args.workers)  # warm-up (and page cache)
    runs: dict[str, list] = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm, workers in arms.items():
            runs[arm].append(timed_job(vlm, bench(), method, dims, 1, workers))
    stats = {arm: summarize(r, args.videos) for arm, r in runs.items()}
    tokens = vlm.prepare(next(iter(bench().load()))).num_visual
    print(f"tiny Qwen2-VL at the 7B video budget ({FRAMES} frames -> {tokens} visual tokens), vanilla, batch 1, "
          f"{args.threads} model thread(s), {args.rounds} interleaved rounds; medians")
    for arm, s in stats.items():
        model = s["encode"] + s["generate"]
        print(f"{arm:<12} {s['rate']:5.2f} samples/s | waiting on preparation {s['prepare']:5.1%} | "
              f"model (encode + generate) {model:5.1%} | bookkeeping {s['rest']:5.1%}")
    ratio = stats[f"{args.workers} workers"]["rate"] / stats["in-process"]["rate"]
    print(f"{args.workers} workers / in-process: {ratio:.2f}x samples/s (target >= 1.6x with 2 workers)")

    batch_s, seek_s, same = decode_times(root / "data" / "clip000.mp4", 3)
    print(f"decode {FRAMES} of {SECONDS * FPS} frames: get_batch {batch_s:.3f} s, seek + read per frame {seek_s:.3f} s "
          f"({seek_s / batch_s:.2f}x); identical frames: {same}")


if __name__ == "__main__":
    main()
