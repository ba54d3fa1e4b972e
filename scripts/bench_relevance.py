"""Benchmark: Eq. 1 relevance vs the naive N x N reference, and where relevance spends its time.

The variants are timed interleaved, one run of each per round after an untimed warm-up round, so
the drifts of a shared machine hit them alike; figures are medians over rounds unless said. glibc is
told to keep freed memory (unless --no-keep-freed-memory): otherwise each run faults in a varying
number of fresh pages for its N x N maps, a large source of run-to-run spread. Prints (machines are
noisy, so compare ratios, not seconds):
  * speed ratio of `relevance` vs `naive_relevance` at ~1000 visual tokens (target >= 20x), and its
    ceiling (model passes + N x N work) / model passes, with the N x N work — the naive's per-token,
    per-layer head reduction and N x N product — timed on its own on tensors of the naive's sizes:
    both pay the model's forward + T backward passes, the naive adds only that work;
  * the model's forward and backward passes (hook-free, one backward per answer token);
  * the share of `relevance`'s time outside those passes (head reduction, propagation, copies;
    target <= 20 %): the per-layer folds timed inside the calls, and two subtractions of the
    hook-free passes — paired per round, and of the per-variant minima;
  * per-token hooks vs batched backward (`is_grads_batched`) at equal results.

    python scripts/bench_relevance.py [--tokens 1000] [--answer 4] [--repeats 9] [--naive-runs 2]
                                      [--no-keep-freed-memory]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from explain_prune.explain.reference import naive_relevance, relevance_matrix  # noqa: E402
from explain_prune.explain.relevance import relevance, teacher_forced_attentions  # noqa: E402
from explain_prune.models import Sample, build_vlm  # noqa: E402

# the module, not the function `explain_prune.explain.relevance` re-exported by the package
relevance_module = importlib.import_module("explain_prune.explain.relevance")

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h> mallopt parameters


def keep_freed_memory() -> bool:
    """Tells glibc to serve every block from the heap (no mmap) and never trim it, so repeated runs
    reuse the pages freed by the previous ones instead of faulting in fresh pages, a cost that
    varies from run to run with the heap's state. False where mallopt is missing (not glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    never = 2 ** (8 * ctypes.sizeof(ctypes.c_int) - 1) - 1  # INT_MAX bytes of free heap top
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, never))


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def build_inputs(model: str, tokens: int, answer_tokens: int):
    """The model, a random square image of about `tokens` visual tokens, and random answer ids."""
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{model}.yaml")
    side = int((tokens * 28 * 28) ** 0.5) // 28 * 28
    cfg.image.max_pixels = side * side
    vlm = build_vlm(cfg)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    prompt = vlm.prepare(Sample(id="bench", question="What color is the object ?", images=[image]))
    answer = torch.randint(20, 200, (answer_tokens,)).tolist()
    return vlm, prompt, answer


@contextmanager
def fold_timer():
    """Swaps relevance's per-layer fold (`_fold_row`, the bookkeeping its hooks run) for a timed
    wrapper; yields a one-element list holding the seconds spent in it."""
    seconds = [0.0]
    fold_row = relevance_module._fold_row

    def timed_fold(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fold_row(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    relevance_module._fold_row = timed_fold
    try:
        yield seconds
    finally:
        relevance_module._fold_row = fold_row


def model_passes(vlm, prompt, answer) -> float:
    """What relevance and the naive both pay: the eager forward, then one backward per answer token
    down to layer 0's map, without hooks. Returns the forward's seconds."""
    start = time.perf_counter()
    logits, attentions, _ = teacher_forced_attentions(vlm, prompt, answer)
    forward_seconds = time.perf_counter() - start
    for t in range(len(answer)):
        torch.autograd.grad(logits[t], attentions[0], retain_graph=t < len(answer) - 1)
    return forward_seconds


def naive_sized_maps(vlm, prompt, answer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random causal, row-stochastic attention maps and their gradients, one [H, N, N] pair per
    layer with the naive's shapes, dtype and device (the values only keep R finite)."""
    _, attentions, _ = teacher_forced_attentions(vlm, prompt, answer)
    heads, length = attentions[0].shape[1], attentions[0].shape[-1]
    like = {"dtype": attentions[0].dtype, "device": attentions[0].device}
    maps, grads = [], []
    for _ in attentions:
        causal = torch.rand(heads, length, length, **like).tril_()
        maps.append(causal / causal.sum(-1, keepdim=True))
        grads.append(torch.randn(heads, length, length, **like))
    return maps, grads


def nxn_work(maps: list[torch.Tensor], grads: list[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """The naive reference's work beyond the model passes: its `relevance_matrix` once per answer token."""
    for _ in range(num_tokens):
        matrix = relevance_matrix(maps, grads)
    return matrix


@dataclass
class Run:
    seconds: float
    page_faults: int  # minor page faults during the run
    output: object


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, runs: dict[str, int]) -> dict[str, list[Run]]:
    """Times the variants in turn, round after round, after an untimed warm-up round of them all.
    `runs[name]` limits a slow variant to that many rounds, spread evenly. Returns one Run per
    timed run of each variant."""
    schedule = {name: {i * rounds // runs[name] for i in range(runs[name])} if name in runs else set(range(rounds))
                for name in variants}
    for fn in variants.values():
        fn()
    timings = {name: [] for name in variants}
    for round_ in range(rounds):
        for name, fn in variants.items():
            if round_ in schedule[name]:
                faults, start = minor_page_faults(), time.perf_counter()
                output = fn()
                timings[name].append(Run(time.perf_counter() - start, minor_page_faults() - faults, output))
    return timings


def max_rel_diff(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1000, help="approximate visual tokens")
    parser.add_argument("--answer", type=int, default=4, help="answer tokens")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--naive-runs", type=int, default=2, help="rounds that also run the (slow) naive reference")
    parser.add_argument("--model", default="tiny_qwen2vl")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared 2-core box)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep glibc from returning freed memory to the OS (steadier timings)")
    args = parser.parse_args()
    kept = args.keep_freed_memory and keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vlm, prompt, answer = build_inputs(args.model, args.tokens, args.answer)
    print(f"model {args.model}: {prompt.num_visual} visual tokens, sequence {prompt.length}, {len(answer)} answer tokens")
    maps, grads = naive_sized_maps(vlm, prompt, answer)

    def relevance_timing_folds():
        with fold_timer() as fold_seconds:
            result = relevance(vlm, prompt, answer)
        return result, fold_seconds[0]

    naive_runs = min(args.naive_runs, args.repeats)
    timings = interleaved(
        {
            "model": lambda: model_passes(vlm, prompt, answer),
            "relevance": relevance_timing_folds,
            "batched": lambda: relevance(vlm, prompt, answer, batch_tokens=len(answer)),
            "N x N work": lambda: nxn_work(maps, grads, len(answer)),
            "naive": lambda: naive_relevance(vlm, prompt, answer),
        },
        args.repeats,
        {"naive": naive_runs},
    )
    seconds = {name: [run.seconds for run in runs] for name, runs in timings.items()}
    t = {name: statistics.median(values) for name, values in seconds.items()}
    t_forward = statistics.median(run.output for run in timings["model"])
    (r_fast, _), r_batched, r_naive = (timings[name][-1].output for name in ("relevance", "batched", "naive"))
    fold_share = statistics.median(run.output[1] / run.seconds for run in timings["relevance"])
    paired_share = statistics.median((rel - model) / rel for rel, model in zip(seconds["relevance"], seconds["model"]))
    minima_share = (min(seconds["relevance"]) - min(seconds["model"])) / min(seconds["relevance"])
    ratio, ceiling = t["naive"] / t["relevance"], (t["model"] + t["N x N work"]) / t["model"]
    faults = ", ".join(f"{name} {statistics.median(run.page_faults for run in runs):.0f}" for name, runs in timings.items())

    print(f"timing: {args.repeats} interleaved rounds after a warm-up round, naive in {naive_runs} of them; medians over rounds")
    print(f"allocator: freed memory {'kept' if kept else 'returned to the OS'}; minor page faults per run: {faults}")
    print(f"relevance (hooks, 1 backward/token): {t['relevance']:.3f} s   naive N x N: {t['naive']:.3f} s")
    print(f"speed ratio relevance / naive: {ratio:.1f}x   (target >= 20x; max rel. diff {max_rel_diff(r_fast, r_naive):.1e})")
    print(f"ceiling of that ratio: (model passes {t['model']:.3f} s + N x N work {t['N x N work']:.3f} s) / model passes "
          f"= {ceiling:.1f}x; the measured {ratio:.1f}x is {ratio / ceiling:.0%} of it")
    print(f"  a bound by construction: both pay the model's forward + {len(answer)} backward passes, the naive adds only "
          f"the N x N work ({len(maps)} layers x {len(answer)} tokens head reductions and N x N products); "
          f"check: naive {t['naive']:.3f} s vs {t['model'] + t['N x N work']:.3f} s")
    print(f"model forward {t_forward:.3f} s + backward passes {t['model'] - t_forward:.3f} s = {t['model']:.3f} s")
    print("bookkeeping share of relevance (target <= 20 %):")
    for label, share in (
        ("folds timed inside the calls, median over rounds of folds / relevance", fold_share),
        ("paired subtraction, median over rounds of (relevance - model) / relevance", paired_share),
        ("subtraction of the minima, (min relevance - min model) / min relevance", minima_share),
    ):
        print(f"  {label + ':':<76} {share:6.1%}")
    print(f"batched backward ({len(answer)} tokens at once): {t['batched']:.3f} s -> hooks/batched speed ratio "
          f"{t['batched'] / t['relevance']:.2f} (>1 means per-token hooks are faster; "
          f"max rel. diff {max_rel_diff(r_batched, r_naive):.1e})")


if __name__ == "__main__":
    main()
