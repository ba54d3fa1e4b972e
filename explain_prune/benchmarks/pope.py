"""POPE (Li et al. 2023): object-hallucination Yes/No questions in three splits.

Data: `$LMUData/POPE.tsv` (VLMEvalKit format; index, image, question, answer, category). `category`
names the split(s) — adversarial / popular / random — and may be comma-separated when one question
belongs to several splits; such a row is counted once per split (VLMEvalKit `POPE_rating` explodes
the column *before* computing the overall numbers too).

Prompt per family: `vlmeval_qwen2vl_yorn` = question + " Please answer yes or no." for Qwen2-VL
(`Qwen2VLPromptMixin._build_yorn_prompt`, vlmeval/vlm/qwen2_vl/prompt.py); `vlmeval_raw_question` =
the question alone for LLaVA-OneVision and VILA (no custom prompt: the dataset default,
`ImageBaseDataset.build_prompt`). Extraction `vlmeval_yorn` (`extract.extract_yes_no`).

Scoring follows VLMEvalKit's `POPE_rating` (vlmeval/dataset/utils/yorn.py, with the per-row score of
vlmeval/dataset/image_yorn.py, `score = answer == extracted`; VLMEvalKit e8e78f05, file last changed
in 401916c0): precision, recall and F1 treat an "Unknown" extraction as a "No" prediction, while
accuracy counts it wrong — so "I don't know" to a truth-No question is not a correct answer.
`accuracy_unknown_as_no` is the accuracy with "Unknown" read as "No" (what this project reported
before; an extra field, not the reference). Also the yes-ratio (share of "Yes" predictions, POPE's
own definition; lmms-eval's `pope_yes_ratio` instead counts ground-truth "yes"), all in %, overall
and per split. `overall` is the overall F1 — what VLMEvalKit reports as POPE "Overall".
"""

from __future__ import annotations

from typing import Any

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.extract import YES_NO_EXTRACTION_ID, extract_yes_no
from explain_prune.benchmarks.mme import normalize_yes_no_answer
from explain_prune.benchmarks.vlmeval_tsv import (
    RowError,
    TSVRow,
    VLMEvalMatchedBenchmark,
    percent,
)
from explain_prune.benchmarks.matcher import MatchStats, match_yes_no
from explain_prune.core import Sample
from explain_prune.benchmarks.base import BENCHMARKS

YORN_SUFFIX = " Please answer yes or no."


def binary_metrics(rows: list[tuple[str, str]]) -> dict[str, float]:
    """(answer, extracted) pairs, each "Yes" / "No" (extracted may be "Unknown") -> accuracy /
    precision / recall / F1 / yes_ratio in %.

    Precision (recall) is 0 when there is no predicted (true) positive, F1 is 0 when both are 0."""
    pairs = [(answer == "Yes", extracted == "Yes") for answer, extracted in rows]
    tp = sum(t and p for t, p in pairs)
    fp = sum((not t) and p for t, p in pairs)
    fn = sum(t and (not p) for t, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(sum(answer == extracted for answer, extracted in rows), len(rows)),
        "accuracy_unknown_as_no": percent(sum(t == p for t, p in pairs), len(pairs)),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": percent(sum(p for _, p in pairs), len(pairs)),
        "n": len(pairs),
    }


def split_names(category: str | None) -> list[str]:
    return [c.strip() for c in (category or "").split(",") if c.strip()]


@BENCHMARKS.register("pope")
class POPE(VLMEvalMatchedBenchmark):
    tsv_name = "POPE"
    extraction_id = YES_NO_EXTRACTION_ID
    max_new_tokens = 16

    @property
    def prompt_id(self) -> str:
        return "vlmeval_qwen2vl_yorn" if self.qwen2vl_prompts else "vlmeval_raw_question"

    def make_sample(self, row: TSVRow) -> Sample:
        meta = self.base_meta(row)
        answer = normalize_yes_no_answer(row.get("answer"))
        splits = split_names(meta["category"])
        if not splits:
            raise RowError("row has no category (the POPE split)")
        meta["answer"] = answer
        meta["splits"] = splits
        question = row.get("question") + (YORN_SUFFIX if self.qwen2vl_prompts else "")
        return Sample(id=row.index, question=question, images=row.images, answer=answer, meta=meta)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return extract_yes_no(prediction)

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        exploded: list[tuple[str, str, str]] = []  # (split, answer, extracted), a row once per split
        unknown = 0
        stats = MatchStats()
        for rec in records:
            rec.extracted = self.extract(rec.prediction, rec.meta)
            if rec.extracted == "Unknown" and self.llm_matcher:
                rec.extracted = match_yes_no(self.matcher_judge(judge), rec.meta["question"], rec.prediction, stats)
            unknown += rec.extracted == "Unknown"
            splits = rec.meta.get("splits") or split_names(rec.meta.get("category"))
            exploded.extend((s, rec.answer, rec.extracted) for s in splits)
        overall = binary_metrics([(a, e) for _, a, e in exploded])
        splits = {
            s: binary_metrics([(a, e) for name, a, e in exploded if name == s])
            for s in sorted({name for name, _, _ in exploded})
        }
        return {
            **self.describe(),
            "n": len(records),
            "n_exploded": len(exploded),
            "overall": overall["f1"],
            **{k: overall[k] for k in ("accuracy", "accuracy_unknown_as_no", "precision", "recall", "f1", "yes_ratio")},
            "splits": splits,
            "unknown_answers": unknown,
            **({"llm_matcher_stats": stats.record(judge)} if self.llm_matcher else {}),
        }
