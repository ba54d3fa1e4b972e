"""MM-Vet (Yu et al. 2024): open-ended questions graded by an LLM judge.

Data: `$LMUData/MMVet.tsv` (VLMEvalKit format; index, image, question, answer, category). `answer`
may join several required elements with `<AND>` or alternatives with `<OR>`; `category` lists the
capabilities a question needs, comma-separated (rec, ocr, know, gen, spat, math).

Prompt `vlmeval_raw_question`: the TSV question as is (VLMEvalKit uses no template for MMVet, also not
for Qwen2-VL). Extraction: none — the judge sees the raw prediction.

Scoring `mmvet_gpt_grader` (VLMEvalKit `MMVet_auxeval` / `MMVet_acc`, MM-Vet's own grader): the
judge receives MM-Vet's few-shot grading prompt (a table of graded examples explaining `<AND>` =
every element required, `<OR>` = any one suffices) ending in the row
"question | ground truth (with spaces around <AND>/<OR>) | prediction | " and must complete the
correctness score. The reply is parsed as a float in [0, 1] (a finite number, nothing else); try i
(i = 0..4) uses temperature 0.5·i; after 5 unparsable replies the score is 0.0. A judge that cannot
be reached (after its own transport retries) also gives 0.0 and is counted in `judge_failed`; if
*every* item fails that way scoring stops with an error instead of reporting 0. Reported ×100:
`overall` (mean over all questions), per capability and per capability combination (category with
"," -> "_") as VLMEvalKit's `MMVet_acc` computes them — a single-capability item counts twice for
its capability (`capability_tables`) — and the same two tables with every item counted once
(`capabilities_corrected`, `combinations_corrected`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.judge import Judge
from explain_prune.benchmarks.vlmeval_tsv import TSVRow, VLMEvalImageBenchmark, percent
from explain_prune.core import InputError, Sample
from explain_prune.benchmarks.base import BENCHMARKS

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")

# MM-Vet's grader prompt, with the line breaks of VLMEvalKit's copy (vlmeval/dataset/utils/mmvet.py),
# the version the paper's numbers were produced with. It is part of the metric: changing a character
# changes the judge's scores, hence the pinned id below.
GRADER_PROMPT_ID = "mmvet_gpt_grader_vlmevalkit"
_GRADER_PROMPT = """
Compare the ground truth and prediction from AI models, to give a correctness score for the prediction.
<AND> in the ground truth means it is totally right
only when all elements in the ground truth are present in the prediction,
and <OR> means it is totally right when any one element in the ground truth is present in the prediction.
The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right).
Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme talks about Iceland and Greenland. It's pointing out that despite their names,
Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme is using humor to point out the misleading nature of Iceland's and Greenland's names.
Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow.
The text 'This is why I have trust issues' is a playful way to suggest
that these contradictions can lead to distrust or confusion.
The humor in this meme is derived from the unexpected contrast between the names of the countries
and their actual physical characteristics. | 1.0
"""


def grader_prompt(question: str, answer: str, prediction: str) -> str:
    """The full judge prompt for one item (the last table row is left for the judge to complete)."""
    gt = str(answer).replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return _GRADER_PROMPT + "\n" + " | ".join([str(question), gt, str(prediction), ""])


def parse_grade(reply: str | None) -> float | None:
    """The judge's reply as a score in [0, 1], or None if it is not exactly one finite number."""
    if reply is None:
        return None
    try:
        value = float(reply)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0.0 or value > 1.0:
        return None
    return value


def rule_grade(answer: str, prediction: str) -> float:
    """Offline stand-in grade for `FakeJudge` (NOT MM-Vet's metric): share of `<AND>` elements found
    in the prediction (case-insensitive substring), rounded to 0.1; 1.0 if any `<OR>` element is
    found; otherwise 1.0 iff the whole answer occurs in the prediction."""
    pred = str(prediction).lower()
    gt = str(answer)
    if "<AND>" in gt:
        parts = [p.strip().lower() for p in gt.split("<AND>") if p.strip()]
        return round(sum(p in pred for p in parts) / len(parts), 1) if parts else 0.0
    if "<OR>" in gt:
        parts = [p.strip().lower() for p in gt.split("<OR>") if p.strip()]
        return 1.0 if any(p in pred for p in parts) else 0.0
    return 1.0 if gt.strip().lower() in pred else 0.0


def capability_tables(
    records: list[Record], grades: list[float]
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """(reference, per capability, per combination) grade lists.

    The reference is VLMEvalKit's `MMVet_acc` (vlmeval/dataset/utils/mmvet.py, e8e78f05): one table for
    both capabilities and combinations, a capability matched as a substring of the category. A
    single-capability item ("rec") is therefore counted twice under its capability, and a
    single-capability combination reports that merged number. The other two tables count each item
    once per capability it lists and once in its own combination."""
    shared: dict[str, list[float]] = {}
    caps: dict[str, list[float]] = {}
    combos: dict[str, list[float]] = {}
    for rec, value in zip(records, grades):
        category = rec.meta.get("category") or ""
        combo = category.replace(",", "_")
        for cap in CAPABILITIES:
            if cap in category:
                shared.setdefault(cap, []).append(value)
        shared.setdefault(combo, []).append(value)
        for cap in (c.strip() for c in category.split(",") if c.strip()):
            caps.setdefault(cap, []).append(value)
        combos.setdefault(combo, []).append(value)
    return shared, caps, combos


@BENCHMARKS.register("mmvet")
class MMVet(VLMEvalImageBenchmark):
    tsv_name = "MMVet"
    prompt_id = "vlmeval_raw_question"
    extraction_id = GRADER_PROMPT_ID
    needs_judge = True
    max_new_tokens = 512

    def __init__(
        self,
        root: str | Path | None = None,
        tsv: str | None = None,
        limit: int | None = None,
        max_new_tokens: int | None = None,
        judge_tries: int = 5,
        judge_max_tokens: int | None = 3,
    ):
        super().__init__(root=root, tsv=tsv, limit=limit, max_new_tokens=max_new_tokens)
        self.judge_tries = int(judge_tries)
        # VLMEvalKit and MM-Vet's own script ask the judge for at most 3 tokens.
        self.judge_max_tokens = None if judge_max_tokens is None else int(judge_max_tokens)

    def make_sample(self, row: TSVRow) -> Sample:
        meta = self.base_meta(row)
        meta["answer"] = row.get("answer")
        return Sample(
            id=row.index, question=row.get("question"), images=row.images, answer=row.get("answer"), meta=meta
        )

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return str(prediction)

    def grade(self, judge: Judge, question: str, answer: str, prediction: str) -> tuple[float, list[str], bool]:
        """(score, log lines, reached_judge) for one item, with MM-Vet's retry rule."""
        prompt = grader_prompt(question, answer, prediction)
        lines: list[str] = []
        for i in range(self.judge_tries):
            reply = judge.complete(
                prompt,
                temperature=0.5 * i,
                max_tokens=self.judge_max_tokens,
                fake_reply=lambda: f"{rule_grade(answer, prediction):.1f}",
            )
            if not reply.ok:
                lines.append(f"try {i}: judge request failed: {reply.error}")
                return 0.0, lines, False
            value = parse_grade(reply.text)
            if value is not None:
                lines.append(f"try {i}: score {value}")
                return value, lines, True
            lines.append(f"try {i}: unparsable or out-of-range reply {reply.text!r}")
        lines.append(f"all {self.judge_tries} tries failed: score 0.0")
        return 0.0, lines, True

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        if judge is None:
            raise InputError(
                "mmvet is scored by an LLM judge: run with judge=openai_compatible "
                "(or judge=fake for an offline smoke run whose scores are not MM-Vet's)"
            )
        grades: list[float] = []
        unreachable = 0
        exhausted = 0
        for rec in records:
            value, lines, reached = self.grade(judge, rec.meta["question"], rec.answer, rec.prediction)
            unreachable += not reached
            exhausted += reached and lines[-1].startswith("all ")
            rec.extracted = value
            rec.meta["judge_score"] = value
            rec.meta["judge_log"] = lines
            grades.append(value)
        if records and unreachable == len(records):
            last = records[-1].meta["judge_log"][-1]
            raise InputError(f"the judge could not be reached for any of the {len(records)} items ({last})")

        shared, caps, combos = capability_tables(records, grades)
        order = [c for c in CAPABILITIES if c in caps] + sorted(set(caps) - set(CAPABILITIES))
        mean = lambda values: percent(sum(values), len(values))  # noqa: E731
        return {
            **self.describe(),
            "n": len(records),
            "overall": mean(grades),
            "capabilities": {c: mean(shared[c]) for c in CAPABILITIES if c in shared},
            "combinations": {k: mean(shared[k]) for k in sorted(combos)},
            "capabilities_corrected": {c: mean(caps[c]) for c in order},
            "combinations_corrected": {k: mean(v) for k, v in sorted(combos.items())},
            "judge": judge.describe(),
            "judge_failed": unreachable,
            "judge_unparsable": exhausted,
        }
