"""Single-answer multiple-choice benchmarks stored as VLMEvalKit TSVs (MMStar, SEEDBench_IMG).

Prompt (`vlmeval_tsv.mcq_prompt`): "Hint: ..." (if any), "Question: ...", "Options:" with one
"X. text" line per non-empty option column, "Please select the correct answer from the options
above." — stripped for Qwen2-VL (`vlmeval_qwen2vl_mcq`), followed by " \n" for LLaVA-OneVision and
VILA (`vlmeval_default_mcq`, the dataset default they use). Extraction `vlmeval_can_infer` (`extract.extract_option_letter`) under the
exact-matching policy: no judge; an answer no option can be inferred from scores as wrong.
`llm_matcher: true` asks the run's judge instead, as VLMEvalKit does with an API key (benchmarks.matcher).

Scoring (VLMEvalKit `mcq_vanilla_eval` + `report_acc`): hit = extracted letter == answer letter;
accuracy in % overall and per `category`, `l2-category` and `split` where the TSV has them.
"""

from __future__ import annotations

from typing import Any

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.extract import (
    OPTION_LETTER_EXTRACTION_ID,
    extract_option_letter,
)
from explain_prune.benchmarks.vlmeval_tsv import (
    RowError,
    TSVRow,
    VLMEvalMatchedBenchmark,
    grouped_accuracy,
    mcq_prompt,
    percent,
    row_options,
)
from explain_prune.benchmarks.matcher import MatchStats, match_option
from explain_prune.core import Sample


class VLMEvalMCQBenchmark(VLMEvalMatchedBenchmark):
    @property
    def prompt_id(self) -> str:
        return "vlmeval_qwen2vl_mcq" if self.qwen2vl_prompts else "vlmeval_default_mcq"
    extraction_id = OPTION_LETTER_EXTRACTION_ID
    max_new_tokens = 32

    def make_sample(self, row: TSVRow) -> Sample:
        options = row_options(row.cells)
        if len(options) < 2:
            raise RowError(f"row has {len(options)} non-empty option column(s); a choice needs at least 2")
        answer = row.get("answer").strip()
        if answer not in options:
            raise RowError(f"answer {answer!r} is not one of the options {sorted(options)}")
        meta = self.base_meta(row)
        meta["hint"] = row.get("hint")
        meta["options"] = options
        meta["answer"] = answer
        question = mcq_prompt(row.get("question"), options, hint=row.get("hint"), qwen2vl=self.qwen2vl_prompts)
        return Sample(id=row.index, question=question, images=row.images, answer=answer, meta=meta, verbatim=True)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str | None:
        return extract_option_letter(prediction, sample_meta["options"])

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        hits: list[bool] = []
        stats = MatchStats()
        for rec in records:
            rec.extracted = self.extract(rec.prediction, rec.meta)
            if rec.extracted is None and self.llm_matcher:
                rec.extracted = match_option(self.matcher_judge(judge), rec.meta["question"], rec.meta["options"],
                                             rec.prediction, rec.id, stats)
            hits.append(rec.extracted is not None and rec.extracted == rec.answer)
        result: dict[str, Any] = {
            **self.describe(),
            "n": len(records),
            "overall": percent(sum(hits), len(hits)),
            "unextracted": sum(rec.extracted is None for rec in records),
        }
        if self.llm_matcher:
            result["llm_matcher_stats"] = stats.record(judge)
        for column, key in (("category", "categories"), ("l2-category", "l2_categories"), ("split", "splits")):
            groups = grouped_accuracy([(rec.meta.get(column), ok) for rec, ok in zip(records, hits)])
            if groups:
                result[key] = groups
        return result
