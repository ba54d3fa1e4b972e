"""Is the data path fast enough for f_θ training?  One run prints, on a synthetic cache of realistic
lengths (default 10K samples of 1300-1900 visual tokens, as App. B's ~1500):

  - loader samples/s (RelevanceDataModule's train loader: bucketed batches, pad + mask + R_v* labels),
  - training-step samples/s (f_θ of App. B, forward + masked KL + backward + Adam, batch 128),
  - their ratio (target >= 5x) and the padding fraction of an epoch of batches (target <= 10 %).

    python scripts/bench_datamodule.py [--samples 10000] [--workers 2] [--steps 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from explain_prune.compress.module import CompressorModule, masked_kl
from explain_prune.data.cache import CacheReader
from explain_prune.compress.datamodule import RelevanceDataModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the planted-cache fixture
from planted import write_planted_cache  # noqa: E402

EXPECT = {"model": "tiny_qwen2vl", "data": "synthetic", "modality": "image"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--min-len", type=int, default=1300)
    parser.add_argument("--max-len", type=int, default=1900)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=40, help="batches timed for the loader")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="reuse/keep the synthetic cache here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tmp = None
    cache = args.cache
    if cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_dm_")
        cache = Path(tmp.name) / "cache"
    t0 = time.perf_counter()
    write_planted_cache(cache, args.samples, args.min_len, args.max_len, shard_size=256)
    t_write = time.perf_counter() - t0

    t0 = time.perf_counter()
    dm = RelevanceDataModule(
        [cache], EXPECT, batch_size=args.batch_size, num_workers=args.workers, val_fraction=0.1
    )
    dm.setup("fit")
    t_open = time.perf_counter() - t0
    loader = dm.train_dataloader()
    sampler = loader.batch_sampler

    # loader throughput (the first batch includes worker start-up; it is not timed)
    it = iter(loader)
    next(it)
    n = 0
    t0 = time.perf_counter()
    for _ in range(args.loader_batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["ids"])
    loader_sps = n / (time.perf_counter() - t0)
    del it

    # training-step throughput on real batches
    module = CompressorModule()
    opt = module.configure_optimizers()  # Adam, lr 1e-3
    batches = [b for _, b in zip(range(args.steps + 1), iter(dm.train_dataloader()))]

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = masked_kl(b["label"], module.net.log_prob(b["a0"], b["mask"]), b["mask"]).mean()
        loss.backward()
        opt.step()

    step(batches[0])
    m = 0
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
        m += len(b["ids"])
    step_sps = m / (time.perf_counter() - t0)

    lengths = CacheReader(cache, EXPECT).lengths
    report = {
        "samples": args.samples,
        "lengths": [min(lengths), max(lengths)],
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads,
        "cache_write_s": round(t_write, 1),
        "cache_open_verify_s": round(t_open, 2),
        "loader_samples_per_s": round(loader_sps, 1),
        "train_step_samples_per_s": round(step_sps, 1),
        "loader_over_step": round(loader_sps / step_sps, 1),
        "padding_fraction": round(sampler.padding_fraction(), 4),
        "targets": {"loader_over_step": ">= 5", "padding_fraction": "<= 0.10"},
    }
    print(json.dumps(report, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
