"""The synthetic grid VQA task (explain_prune.synthetic) as a benchmark with known relevant tokens.

No data root: the benchmark generates `limit` held-out samples, sample i being
`generator.make_sample(config, seed, i)`.  The default seed `BENCHMARK_SEED` is none of the streams
the project trains on (synthetic/fit.py: `seed + 7919 * k` from seed 0, `VAL_SEED`, `TEST_SEED`;
conf/data/synthetic.yaml: 2024), so the model and f_θ never saw these scenes.  `generator`
overrides `SyntheticConfig` fields, so the same benchmark makes the 4x-tokens set
(`grid: 8` -> 448², 256 tokens) and the video variant (`frames: 8`).

Prompt `synthetic_question`: the generated question as is (the model was trained on exactly that).
Extraction `synthetic_first_word`: lower-case, VQA punctuation rule
(`extract.vqa_normalize_punctuation`), then the first word: the answer is one token, and that is
what the model was trained and measured on (synthetic/fit.py scores the greedy first answer
token).  Pruned inputs sometimes make the model run on after a right word instead of closing with
<|im_end|> ("square blue"), so `exact_match` (the whole normalised prediction equals the answer)
is reported beside it; 2 new tokens suffice to tell the two apart.

Scoring: accuracy in % (`overall`), overall and by question type and by number of objects, plus the
pointing game aggregated from the per-sample `sample_metrics` (`pointing_game`, below).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch

from explain_prune.benchmarks.base import Benchmark, Record
from explain_prune.benchmarks.extract import vqa_normalize_punctuation
from explain_prune.benchmarks.vlmeval_tsv import grouped_accuracy, percent
from explain_prune.core import DeferredSample, InputError, Sample
from explain_prune.synthetic.generator import deferred_samples, make_sample, synthetic_config
from explain_prune.benchmarks.base import BENCHMARKS

BENCHMARK_SEED = 1_000_003  # held-out stream of this benchmark; tests check it is no training stream
POINTING_KEYS = ("argmax_hit", "topk_precision", "topk_mass_in_gt", "mass_in_gt")


def expected_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[N] float64: probability that each token is among the k highest scores when ties are
    broken uniformly at random (1 above the k-th value, m / t for the t tokens tied at it that
    share the m remaining slots, 0 below), so the metrics depend neither on token order nor on a
    tie-breaking rule, and constant scores give exactly the uniform reference."""
    s = scores.double()
    kth = torch.sort(s, descending=True).values[k - 1]
    above, tied = s > kth, s == kth
    slots = k - int(above.sum())
    return above.double() + tied.double() * (slots / int(tied.sum()))


def pointing_game(scores: torch.Tensor, gt_tokens: list[int]) -> dict[str, float | None]:
    """Pointing-game metrics of one sample's ranking scores [N_v] against its ground-truth tokens.

    With k = |gt|, s⁺ = max(s, 0) and p = expected_topk(s, k):
      argmax_hit      = P(arg-max token ∈ gt)                     (ties: share of the tied maxima in gt)
      topk_precision  = Σ_gt p / k                                 (= recall@k, since k = |gt|)
      topk_mass_in_gt = Σ_gt p s⁺ / Σ_all p s⁺                     (None when the top-k hold no positive mass)
      mass_in_gt      = Σ_gt s⁺ / Σ_all s⁺                         (None when no score is positive)
      uniform         = k / N_v: every metric's value for constant scores (for the rank metrics also
                        their expectation under a uniformly random ranking)
    The top-k are ranked by the raw scores, as the methods rank; only the mass uses s⁺.
    """
    s = scores.detach().double().flatten()
    n = s.numel()
    if not bool(torch.isfinite(s).all()):
        raise InputError("pointing game: the ranking scores contain NaN or inf")
    gt = torch.as_tensor(sorted({int(i) for i in gt_tokens}), dtype=torch.long)
    if gt.numel() == 0 or int(gt.min()) < 0 or int(gt.max()) >= n:
        raise InputError(f"pointing game: gt_tokens must be a non-empty subset of 0..{n - 1}, got {gt_tokens}")
    in_gt = torch.zeros(n, dtype=torch.double)
    in_gt[gt] = 1.0
    k = gt.numel()
    pos = s.clamp(min=0)
    p = expected_topk(s, k)
    topk_mass, total = float((p * pos).sum()), float(pos.sum())
    return {
        "argmax_hit": float((expected_topk(s, 1) * in_gt).sum()),
        "topk_precision": float((p * in_gt).sum()) / k,
        "topk_mass_in_gt": float((p * pos * in_gt).sum()) / topk_mass if topk_mass > 0 else None,
        "mass_in_gt": float((pos * in_gt).sum()) / total if total > 0 else None,
        "uniform": k / n,
        "k": k,
        "num_visual": n,
    }


def aggregate_pointing(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Means in % of each pointing metric over the samples where it is defined (None: no sample
    has one), with the count of defined samples and the uniform reference over the same samples."""
    if not metrics:
        return None
    out: dict[str, Any] = {"n": len(metrics)}
    for key in POINTING_KEYS:
        defined = [m for m in metrics if m.get(key) is not None]
        out[key] = percent(sum(m[key] for m in defined), len(defined)) if defined else None
        out[f"{key}_n"] = len(defined)
        out[f"{key}_uniform"] = percent(sum(m["uniform"] for m in defined), len(defined)) if defined else None
    return out


def normalize_answer(prediction: str) -> str:
    return " ".join(vqa_normalize_punctuation(str(prediction).lower()).split())


def first_word(prediction: str) -> str:
    """The first word of the normalised prediction ("" for an empty answer)."""
    return (normalize_answer(prediction).split() or [""])[0]


@BENCHMARKS.register("synthetic")
class SyntheticBenchmark(Benchmark):
    prompt_id = "synthetic_question"
    extraction_id = "synthetic_first_word"
    max_new_tokens = 2  # the answer word + <|im_end|> (anything else in 2nd place is a run-on)

    def __init__(
        self,
        root: Any = None,
        limit: int | None = None,
        seed: int = BENCHMARK_SEED,
        generator: Mapping[str, Any] | None = None,
        max_new_tokens: int | None = None,
    ):
        if root not in (None, ""):
            raise InputError(f"benchmark synthetic generates its samples and takes no data root, got root={root!r}")
        if limit is None or isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InputError(f"benchmark synthetic: limit (the number of samples to generate) must be a positive integer, got {limit!r}")
        self.root = None  # Benchmark.__init__ is not called: it needs a data root
        self.options = {"limit": limit, "seed": seed, "generator": dict(generator or {})}
        self.limit = limit
        self.seed = int(seed)
        self.config = synthetic_config(generator)
        self.modality = "video" if self.config.frames else "image"
        if max_new_tokens is not None:
            self.max_new_tokens = int(max_new_tokens)

    def count(self, limit: int | None) -> int:
        return self.limit if limit is None else min(int(limit), self.limit)

    def load(self, limit: int | None = None) -> Iterator[Sample]:
        for index in range(self.count(limit)):
            yield make_sample(self.config, self.seed, index)

    def stream(self, limit: int | None = None) -> Iterator[DeferredSample]:
        """The samples of `load`, rendered only where they are read (in the loader's workers)."""
        return deferred_samples(self.config, self.seed, self.count(limit))

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return first_word(prediction)

    def sample_metrics(self, sample_meta: dict[str, Any], visual_scores: torch.Tensor) -> dict[str, Any] | None:
        t, h, w = sample_meta["visual_grid"]
        if visual_scores.numel() != t * h * w:
            raise InputError(
                f"benchmark synthetic: the model has {visual_scores.numel()} visual tokens for a {t}x{h}x{w} token grid "
                "(it resized the input, so the ground-truth positions do not apply; check the model's pixel budget)"
            )
        return pointing_game(visual_scores, sample_meta["gt_tokens"])

    def describe(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "limit": self.limit,
            "seed": self.seed,
            "generator": dataclasses.asdict(self.config),
            "prompt_id": self.prompt_id,
            "extraction_id": self.extraction_id,
            "max_new_tokens": self.max_new_tokens,
        }

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        correct = []
        for rec in records:
            rec.extracted = self.extract(rec.prediction, rec.meta)
            correct.append(rec.extracted == rec.answer)
        accuracy = percent(sum(correct), len(records))
        return {
            **self.describe(),
            "n": len(records),
            "overall": accuracy,
            "accuracy": accuracy,
            "exact_match": percent(sum(normalize_answer(r.prediction) == r.answer for r in records), len(records)),
            "chance": percent(sum(r.meta["chance"] for r in records), len(records)),
            "out_of_set_answers": sum(r.extracted not in r.meta["answers"] for r in records),
            "question_types": grouped_accuracy([(r.meta["question_type"], c) for r, c in zip(records, correct)]),
            "num_objects": dict(sorted(
                grouped_accuracy([(str(len(r.meta["objects"])), c) for r, c in zip(records, correct)]).items(),
                key=lambda item: int(item[0]),
            )),
            "pointing": aggregate_pointing([r.sample_metrics for r in records if r.sample_metrics is not None]),
        }


__all__ = ["BENCHMARK_SEED", "SyntheticBenchmark", "aggregate_pointing", "expected_topk", "pointing_game"]
