"""Benchmark: Eq. 1 relevance vs the naive N x N reference, and where relevance spends its time.

Prints, in one run (machines are noisy, so compare ratios, not seconds):
  * speed ratio of `relevance` vs `naive_relevance` at ~1000 visual tokens (target >= 20x);
  * the share of `relevance`'s time outside the model's own forward and backward passes
    (head reduction, propagation, copies; target <= 20 %), measured directly by timing the
    per-layer folds inside the same calls, and cross-checked by subtracting a hook-free
    forward + backward run (the subtraction is noisier on a shared machine);
  * per-token hooks vs batched backward (`is_grads_batched`) at equal results.

    python scripts/bench_relevance.py [--tokens 1000] [--answer 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from explain_prune.explain.reference import naive_relevance  # noqa: E402
from explain_prune.explain.relevance import relevance, teacher_forced_attentions  # noqa: E402
from explain_prune.explain import relevance as _  # noqa: E402,F401  (module below, not the function)

relevance_module = sys.modules["explain_prune.explain.relevance"]
from explain_prune.models import Sample, build_vlm  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1000, help="approximate visual tokens")
    parser.add_argument("--answer", type=int, default=4, help="answer tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny_qwen2vl")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{args.model}.yaml")
    side = int((args.tokens * 28 * 28) ** 0.5) // 28 * 28
    cfg.image.max_pixels = side * side
    vlm = build_vlm(cfg)
    from PIL import Image
    import numpy as np

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    prompt = vlm.prepare(Sample(id="bench", question="What color is the object ?", images=[image]))
    answer = torch.randint(20, 200, (args.answer,)).tolist()
    print(f"model {args.model}: {prompt.num_visual} visual tokens, sequence {prompt.length}, {len(answer)} answer tokens")

    fold_seconds = [0.0]
    fold_row = relevance_module._fold_row

    def timed_fold(*a, **k):
        start = time.perf_counter()
        out = fold_row(*a, **k)
        fold_seconds[0] += time.perf_counter() - start
        return out

    def relevance_with_fold_share():
        fold_seconds[0] = 0.0
        start = time.perf_counter()
        result = relevance(vlm, prompt, answer)
        return result, fold_seconds[0] / (time.perf_counter() - start)

    relevance_module._fold_row = timed_fold
    _, fold_shares = zip(*(relevance_with_fold_share() for _ in range(args.repeats)))
    relevance_module._fold_row = fold_row
    fold_share = statistics.median(fold_shares)
    t_fast, r_fast = timed(lambda: relevance(vlm, prompt, answer), args.repeats)
    t_batched, r_batched = timed(lambda: relevance(vlm, prompt, answer, batch_tokens=len(answer)), args.repeats)

    def forward_only():
        return teacher_forced_attentions(vlm, prompt, answer)

    def forward_and_backward():
        logits, attentions, _ = teacher_forced_attentions(vlm, prompt, answer)
        for t in range(len(answer)):
            torch.autograd.grad(logits[t], attentions[0], retain_graph=t < len(answer) - 1)

    t_forward, _ = timed(forward_only, args.repeats)
    t_model, _ = timed(forward_and_backward, args.repeats)
    t_naive, r_naive = timed(lambda: naive_relevance(vlm, prompt, answer), 1)

    diff = float((r_fast - r_naive).abs().max() / r_naive.abs().max())
    diff_b = float((r_batched - r_naive).abs().max() / r_naive.abs().max())
    print(f"relevance (hooks, 1 backward/token): {t_fast:.3f} s   naive N x N: {t_naive:.3f} s")
    print(f"speed ratio relevance / naive: {t_naive / t_fast:.1f}x   (target >= 20x; max rel. diff {diff:.1e})")
    print(f"model forward {t_forward:.3f} s + backward passes {t_model - t_forward:.3f} s = {t_model:.3f} s")
    print(f"bookkeeping share of relevance, timed inside the calls: {fold_share:.1%}   (target <= 20 %)")
    print(f"  cross-check by subtraction (relevance - hook-free forward+backward): {max(0.0, t_fast - t_model) / t_fast:.1%}")
    print(f"batched backward ({len(answer)} tokens at once): {t_batched:.3f} s -> hooks/batched speed ratio "
          f"{t_batched / t_fast:.2f} (>1 means per-token hooks are faster; max rel. diff {diff_b:.1e})")


if __name__ == "__main__":
    main()
