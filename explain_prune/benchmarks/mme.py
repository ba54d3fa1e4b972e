"""MME (Fu et al. 2023): 14 Yes/No subtasks, two questions per image (one "Yes", one "No").

Data: `$LMUData/MME.tsv` (VLMEvalKit format; columns index, image, image_path, question, answer,
category). The second question of an image usually stores the first row's index in `image`.

Prompt `vlmeval_raw_question`: the TSV question as is (MME questions already end with
"Please answer yes or no."; VLMEvalKit applies no template to MME, also not for Qwen2-VL).
Extraction `vlmeval_yorn` (`extract.extract_yes_no`); "Unknown" counts as wrong.

Scoring (VLMEvalKit `MME_rating`, the MME paper's metric): per subtask, acc = % of questions
answered correctly and acc+ = % of images whose questions are *all* correct (images are grouped by
(category, image_path)); the subtask score is acc + acc+ (max 200). Perception = sum over the 10
perception subtasks (max 2000), cognition (VLMEvalKit: "reasoning") = sum over the 4 cognition
subtasks (max 800), total = perception + cognition, reported as `overall`.
"""

from __future__ import annotations

from typing import Any

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.extract import YES_NO_EXTRACTION_ID, extract_yes_no
from explain_prune.benchmarks.vlmeval_tsv import (
    RowError,
    TSVRow,
    VLMEvalMatchedBenchmark,
    percent,
)
from explain_prune.benchmarks.matcher import MatchStats, match_yes_no
from explain_prune.core import Sample
from explain_prune.benchmarks.base import BENCHMARKS

PERCEPTION = (
    "existence", "count", "position", "color", "posters",
    "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def normalize_yes_no_answer(answer: str) -> str:
    """Ground truth "yes"/"YES "/... -> "Yes"/"No"; anything else is not a Yes/No row."""
    text = answer.strip().lower()
    if text not in ("yes", "no"):
        raise RowError(f"answer {answer!r} is not Yes/No")
    return text.capitalize()


@BENCHMARKS.register("mme")
class MME(VLMEvalMatchedBenchmark):
    tsv_name = "MME"
    prompt_id = "vlmeval_raw_question"
    extraction_id = YES_NO_EXTRACTION_ID
    max_new_tokens = 16

    def make_sample(self, row: TSVRow) -> Sample:
        meta = self.base_meta(row)
        if meta["category"] is None:
            raise RowError("row has no category (the MME subtask)")
        answer = normalize_yes_no_answer(row.get("answer"))
        meta["answer"] = answer
        return Sample(id=row.index, question=row.get("question"), images=row.images, answer=answer, meta=meta)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return extract_yes_no(prediction)

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        by_cat: dict[str, dict[str, list[bool]]] = {}
        unknown = 0
        stats = MatchStats()
        for rec in records:
            rec.extracted = self.extract(rec.prediction, rec.meta)
            if rec.extracted == "Unknown" and self.llm_matcher:
                rec.extracted = match_yes_no(self.matcher_judge(judge), rec.meta["question"], rec.prediction, stats)
            unknown += rec.extracted == "Unknown"
            ok = rec.extracted == rec.answer
            cat = rec.meta["category"]
            by_cat.setdefault(cat, {}).setdefault(rec.meta["image_key"], []).append(ok)

        categories: dict[str, dict[str, float]] = {}
        incomplete = 0
        for cat, images in sorted(by_cat.items()):
            answers = [ok for oks in images.values() for ok in oks]
            incomplete += sum(len(oks) != 2 for oks in images.values())
            acc = percent(sum(answers), len(answers))
            acc_plus = percent(sum(all(oks) for oks in images.values()), len(images))
            categories[cat] = {
                "acc": acc,
                "acc_plus": acc_plus,
                "score": acc + acc_plus,
                "questions": len(answers),
                "images": len(images),
            }
        perception = sum(categories[c]["score"] for c in PERCEPTION if c in categories)
        cognition = sum(categories[c]["score"] for c in COGNITION if c in categories)
        known = set(PERCEPTION) | set(COGNITION)
        return {
            **self.describe(),
            "n": len(records),
            "overall": perception + cognition,
            "total": perception + cognition,
            "perception": perception,
            "cognition": cognition,
            "categories": categories,
            "missing_subtasks": [c for c in PERCEPTION + COGNITION if c not in categories],
            "unknown_subtasks": sorted(set(categories) - known),
            # images whose question count is not 2 (e.g. a `limit` cut a pair): acc+ needs all correct
            "incomplete_pairs": incomplete,
            "unknown_answers": unknown,
            **({"llm_matcher_stats": stats.record(judge)} if self.llm_matcher else {}),
        }
