"""Benchmark: evaluate's loop on the project's synthetic model — batch 1 vs 8, in-process vs loader workers.

`stages.evaluate.evaluate` runs the synthetic benchmark with a method (default fastv at 25 %) in three
arms per round (batch 1 in-process, batch 8 in-process, batch 8 with `--workers` loader workers;
rounds interleaved after a warm-up).  Inside the job it times:
  - preparation: what the loop waits for the next prepared sample (the CPU stage itself when
    in-process; with workers, only what they have not yet done ahead of the model);
  - the device stage (`vlm.encode_batch`: vision tower + embeddings) and `engine.generate`;
  - the rest: evaluate's own bookkeeping (extraction, records, scoring, FLOPs).
Prints samples/s and the split per arm, then the targets: batch 8 >= 2x the samples/s of batch 1,
and engine.generate >= 60 % of the loop at batch 8 with workers.

    python scripts/bench_evaluate.py [--samples 64] [--rounds 3] [--method fastv] [--threads 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explain_prune.benchmarks.synthetic import SyntheticBenchmark  # noqa: E402
from explain_prune.methods import build_method  # noqa: E402
from explain_prune.models import build_vlm  # noqa: E402
from explain_prune.stages import evaluate as evaluate_stage  # noqa: E402
from explain_prune.synthetic import register_resolvers  # noqa: E402

PARTS = ("prepare", "encode", "generate")


def timed_job(vlm: Any, benchmark: Any, method: Any, dims: dict, batch: int, workers: int) -> dict[str, float]:
    """Seconds of one evaluate job: wall, and inside it waiting on the loader, encode_batch, generate."""
    inside = dict.fromkeys(PARTS, 0.0)

    def timer(name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[name] += time.perf_counter() - start

        return timed

    def timed_stream(items: Iterator[Any]) -> Iterator[Any]:
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                inside["prepare"] += time.perf_counter() - start
            yield item

    generate, prefetch = evaluate_stage.generate, evaluate_stage.prefetch
    evaluate_stage.generate = timer("generate", generate)
    evaluate_stage.prefetch = lambda *a, **k: timed_stream(prefetch(*a, **k))
    vlm.encode_batch = timer("encode", vlm.encode_batch)
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            evaluate_stage.evaluate(vlm, benchmark, method, out,
                                    evaluate_stage.EvalSettings(batch_size=batch, num_workers=workers), dims)
            return {"wall": time.perf_counter() - start, **inside}
    finally:
        evaluate_stage.generate, evaluate_stage.prefetch = generate, prefetch
        del vlm.encode_batch  # back to the class's method


def summarize(runs: list[dict[str, float]], samples: int) -> dict[str, float]:
    """Medians over rounds: samples/s and each part's share of the job's wall time."""
    out = {"rate": statistics.median(samples / r["wall"] for r in runs)}
    for part in PARTS:
        out[part] = statistics.median(r[part] / r["wall"] for r in runs)
    out["rest"] = 1.0 - out["prepare"] - out["encode"] - out["generate"]
    return out


def line(label: str, s: dict[str, float]) -> str:
    return (f"{label:<24} {s['rate']:6.1f} samples/s | waiting on preparation {s['prepare']:5.1%} | "
            f"encode {s['encode']:5.1%} | engine.generate {s['generate']:5.1%} | bookkeeping {s['rest']:5.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="fastv")
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model stage")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_resolvers()
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "synthetic.yaml")
    vlm = build_vlm(OmegaConf.merge(cfg, {"device": "cpu"}))
    method = build_method(args.method, args.retention)
    dims = OmegaConf.to_container(cfg.llm, resolve=True)
    arms = {"batch 1, in-process": (1, 0), "batch 8, in-process": (8, 0), f"batch 8, {args.workers} workers": (8, args.workers)}
    timed_job(vlm, SyntheticBenchmark(limit=8), method, dims, 8, args.workers)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm, (batch, workers) in arms.items():
            runs[arm].append(timed_job(vlm, SyntheticBenchmark(limit=args.samples), method, dims, batch, workers))
    stats = {arm: summarize(r, args.samples) for arm, r in runs.items()}
    print(f"synthetic model, {args.method} at {args.retention:g}, {args.samples} samples, {args.rounds} interleaved rounds, "
          f"{args.threads} model threads; medians")
    for arm, s in stats.items():
        print(line(arm, s))
    single, best = stats["batch 1, in-process"], stats[f"batch 8, {args.workers} workers"]
    print(f"batch 8 with {args.workers} workers / batch 1 in-process: {best['rate'] / single['rate']:.2f}x samples/s (target >= 2); "
          f"engine.generate share there: {best['generate']:.1%} (target >= 60 %)")
    print(f"batch 8 / batch 1, both in-process: {stats['batch 8, in-process']['rate'] / single['rate']:.2f}x")


if __name__ == "__main__":
    main()
