"""Benchmark: evaluate's own overhead on the project's synthetic model, at batch 1 and batch 8, in one run.

`stages.evaluate.evaluate` runs the synthetic benchmark with a method (default fastv at 25 %) twice per
round (batch 1, batch 8; rounds interleaved after a warm-up).  The `engine.generate` calls and the
`vlm.prepare` calls (image processing + the vision encoder, run per sample) are timed inside the job.
Prints samples/s per batch size, the batch-8 / batch-1 speed ratio (target >= 2), the generate share
at batch 8 (target >= 60 %), and the share of generate + prepare: what is left is evaluate's own
bookkeeping (extraction, records, scoring, FLOPs).

    python scripts/bench_evaluate.py [--samples 64] [--rounds 3] [--method fastv] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explain_prune.benchmarks.synthetic import SyntheticBenchmark  # noqa: E402
from explain_prune.methods import build_method  # noqa: E402
from explain_prune.models import build_vlm  # noqa: E402
from explain_prune.stages import evaluate as evaluate_stage  # noqa: E402
from explain_prune.synthetic import register_resolvers  # noqa: E402


def timed_job(vlm, dims, method, samples: int, batch: int) -> tuple[float, float, float]:
    """(wall seconds of the whole job, seconds inside engine.generate, seconds inside vlm.prepare)."""
    inside = {"generate": 0.0, "prepare": 0.0}

    def timer(name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[name] += time.perf_counter() - start

        return timed

    generate, prepare = evaluate_stage.generate, vlm.prepare
    evaluate_stage.generate, vlm.prepare = timer("generate", generate), timer("prepare", prepare)
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            evaluate_stage.evaluate(vlm, SyntheticBenchmark(limit=samples), method, out,
                                    evaluate_stage.EvalSettings(batch_size=batch), dims)
            return time.perf_counter() - start, inside["generate"], inside["prepare"]
    finally:
        evaluate_stage.generate = generate
        del vlm.prepare  # back to the class's method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="fastv")
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_resolvers()
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "synthetic.yaml")
    vlm = build_vlm(OmegaConf.merge(cfg, {"device": "cpu"}))
    method = build_method(args.method, args.retention)
    results: dict[int, list[tuple[float, float, float]]] = {1: [], 8: []}
    timed_job(vlm, cfg.llm, method, 8, 8)  # warm-up
    for _ in range(args.rounds):
        for batch in (1, 8):
            results[batch].append(timed_job(vlm, cfg.llm, method, args.samples, batch))
    rate = {b: statistics.median(args.samples / wall for wall, _, _ in runs) for b, runs in results.items()}
    share = {b: statistics.median(gen / wall for wall, gen, _ in runs) for b, runs in results.items()}
    model = {b: statistics.median((gen + prep) / wall for wall, gen, prep in runs) for b, runs in results.items()}
    print(f"synthetic model, {args.method} at {args.retention:g}, {args.samples} samples, {args.rounds} interleaved rounds, "
          f"{args.threads} threads; medians")
    for b in (1, 8):
        print(f"batch {b}: {rate[b]:6.1f} samples/s, engine.generate {share[b]:5.1%} of the job, "
              f"generate + prepare {model[b]:5.1%}")
    print(f"batch 8 / batch 1 samples/s: {rate[8] / rate[1]:.2f}x (target >= 2); generate share at batch 8: "
          f"{share[8]:.1%} (target >= 60 %)")


if __name__ == "__main__":
    main()
