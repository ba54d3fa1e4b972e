"""MMBench-Video (Fang et al. 2024): free-form questions on long multi-shot videos, graded 0–3 by an
LLM judge.

Data (`root`, env `MMBENCH_VIDEO_ROOT`): the HF `opencompass/MMBench-Video` release as VLMEvalKit
uses it — `MMBench-Video.tsv` with `index, video, video_path, question, answer, dimensions` (a list
literal of level-3 capability names) and the videos as `video/<video>.mp4` (VLMEvalKit unpacks them
there; the file name is taken from `video_path`'s base name when present).

Prompt `vlmeval_mmbench_video_videollm`: the question as is — what VLMEvalKit sends a video LLM
(Qwen2-VL, LLaVA-OneVision) in the unpacked mode (one question per prompt). Frames: rule `linspace`.
Extraction: none; the judge sees the raw answer.

Scoring `mmbench_video_judge_0to3` (VLMEvalKit `MMBenchVideo.evaluate` + `get_dimension_rating`):
the judge gets VLMEvalKit's rating instructions followed by "Question: ... / Groundtruth answer:
... / Candidate answer: ... / Your response: " (the instructions are VLMEvalKit's *system* prompt;
the project's judge sends one user message, so they lead that message) and must reply with a single
integer. A reply that is exactly one integer 0–3 is the score; anything else, an unreachable judge
or a missing prediction gives −1 (VLMEvalKit also keeps out-of-range integers; here they are
failures). Per level-3 dimension ("fine") and per coarse group (CP, FP-S, FP-C, HL, LR, AR, RR,
CSR, TR, Perception, Reasoning, Overall — an item counts once for every group one of its
dimensions belongs to) two means: `all` counts −1 as 0, `valid` leaves −1 out. `overall` is the
coarse `Overall` under `all` (0–3 scale, as the paper reports it).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.judge import Judge
from explain_prune.benchmarks.video_base import (
    RowError,
    VideoBenchmark,
    list_field,
    text_field,
)
from explain_prune.core import InputError, Sample
from explain_prune.benchmarks.base import BENCHMARKS, normalize_text

TSV = "MMBench-Video.tsv"

# VLMEvalKit `MMV_DIMENSIONS` (vlmeval/dataset/utils/mmbench_video.py): coarse group -> L3 dimensions.
L3_GROUPS: dict[str, tuple[str, ...]] = {
    "CP": ("Video Topic", "Video Emotion", "Video Scene", "Video Style"),
    "FP-S": ("OCR", "Object Recognition", "Attribute Recognition", "Event Recognition", "Human Motion", "Counting"),
    "FP-C": ("Spatial Relationship", "Human-object Interaction", "Human Interaction"),
    "HL": ("Hallucination",),
    "LR": ("Structuralized Image-Text Understanding", "Mathematical Calculation"),
    "AR": ("Physical Property", "Function Reasoning", "Identity Reasoning"),
    "RR": ("Natural Relation", "Physical Relation", "Social Relation"),
    "CSR": ("Common Sense Reasoning",),
    "TR": ("Counterfactual Reasoning", "Causal Reasoning", "Future Prediction"),
}
PERCEPTION = ("CP", "FP-C", "FP-S", "HL")
REASONING = ("LR", "AR", "RR", "CSR", "TR")
COARSE: dict[str, tuple[str, ...]] = {
    **L3_GROUPS,
    "Perception": tuple(d for g in PERCEPTION for d in L3_GROUPS[g]),
    "Reasoning": tuple(d for g in REASONING for d in L3_GROUPS[g]),
    "Overall": tuple(d for g in PERCEPTION + REASONING for d in L3_GROUPS[g]),
}
L3_DIMS = tuple(d for dims in L3_GROUPS.values() for d in dims)

JUDGE_PROMPT_ID = "mmbench_video_judge_0to3"
JUDGE_INSTRUCTIONS = (
    "As an AI assistant, your task is to evaluate a candidate answer in comparison to a given correct answer.\n"
    "The question itself, the correct 'groundtruth' answer, and the candidate answer will be provided to you.\n"
    "Your assessment should range from 0 to 3, "
    "based solely on the semantic similarity between the groundtruth and the candidate answer, "
    "disregarding any grammatical differences.\n"
    "A rating of 0 suggests no similarity, implying the candidate answer is entirely incorrect.\n"
    "A rating of 1 suggests low similarity, meaning the candidate answer is largely incorrect.\n"
    "A rating of 2 suggests high similarity, meaning the candidate answer is largely correct.\n"
    "Lastly, a rating of 3 indicates complete similarity, which means the candidate answer is entirely correct.\n"
    "Your response should be a single integer from 0, 1, 2, or 3."
)


def judge_prompt(question: str, answer: str, prediction: str) -> str:
    item = f"Question: {question}\nGroundtruth answer: {answer}\nCandidate answer: {prediction}\nYour response: "
    return JUDGE_INSTRUCTIONS + "\n\n" + item


def parse_rating(reply: str | None) -> int:
    """The judge's reply as 0–3, or −1 when it is not exactly one integer in that range."""
    if reply is None:
        return -1
    text = reply.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        return -1
    value = int(text)
    return value if 0 <= value <= 3 else -1


def rule_rating(answer: str, prediction: str) -> int:
    """Offline stand-in for `FakeJudge` (NOT the benchmark's metric): 3 if the normalised texts are
    equal, 2 if the answer occurs in the prediction, else 0."""
    a, p = normalize_text(answer), normalize_text(prediction)
    if a and a == p:
        return 3
    return 2 if a and a in p else 0


def rating_tables(items: list[tuple[list[str], int]]) -> dict[str, dict[str, float]]:
    """VLMEvalKit `get_dimension_rating` over (L3 dimensions, score) items; empty groups left out."""
    coarse: dict[str, list[int]] = {k: [] for k in COARSE}
    fine: dict[str, list[int]] = {k: [] for k in L3_DIMS}
    for dims, score in items:
        for d in dims:
            fine[d].append(score)
        for group, members in COARSE.items():
            if any(d in members for d in dims):
                coarse[group].append(score)

    def all_mean(v: list[int]) -> float:
        return sum(max(x, 0) for x in v) / len(v)

    def valid_mean(v: list[int]) -> float | None:
        ok = [x for x in v if x >= 0]
        return sum(ok) / len(ok) if ok else None

    return {
        "coarse_all": {k: all_mean(v) for k, v in coarse.items() if v},
        "coarse_valid": {k: valid_mean(v) for k, v in coarse.items() if v},
        "fine_all": {k: all_mean(v) for k, v in fine.items() if v},
        "fine_valid": {k: valid_mean(v) for k, v in fine.items() if v},
    }


@BENCHMARKS.register("mmbench_video")
class MMBenchVideo(VideoBenchmark):
    env_var = "MMBENCH_VIDEO_ROOT"
    prompt_id = "vlmeval_mmbench_video_videollm"
    extraction_id = JUDGE_PROMPT_ID
    needs_judge = True
    frame_sampling = "linspace"
    max_new_tokens = 256

    def __init__(self, root=None, judge_max_tokens: int | None = 8, **kwargs: Any):
        super().__init__(root, **kwargs)
        self.judge_max_tokens = None if judge_max_tokens is None else int(judge_max_tokens)

    def records(self) -> Iterator[dict[str, Any]]:
        yield from self.read_records((TSV,), ("index", "video", "question", "answer", "dimensions"))

    def record_id(self, rec: dict[str, Any], position: int) -> str:
        return text_field(rec, "index")

    def make_sample(self, rec: dict[str, Any]) -> Sample:
        sid = self.record_id(rec, -1)
        dims = list_field(rec.get("dimensions"), "dimensions")
        unknown = [d for d in dims if d not in L3_DIMS]
        if unknown:
            raise RowError(f"unknown dimension(s) {unknown}")
        question = text_field(rec, "question")
        answer = text_field(rec, "answer")
        video = text_field(rec, "video")
        rel = text_field(rec, "video_path", required=False)
        name = rel.replace("\\", "/").rsplit("/", 1)[-1] if rel else video
        path = self.video_path(self.root / "video", name)
        meta = {**self.video_meta(), "index": sid, "video": video, "question": question, "answer": answer, "dimensions": dims}
        return Sample(id=sid, question=question, video=str(path), answer=answer, meta=meta)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return str(prediction)

    def rate(self, judge: Judge, question: str, answer: str, prediction: str | None) -> tuple[int, str]:
        """(score, log) for one item; −1 when the item could not be rated."""
        if prediction is None:
            return -1, "no prediction"
        reply = judge.complete(
            judge_prompt(question, answer, prediction),
            temperature=0.0,
            max_tokens=self.judge_max_tokens,
            fake_reply=lambda: str(rule_rating(answer, prediction)),
        )
        if not reply.ok:
            return -1, f"judge request failed: {reply.error}"
        score = parse_rating(reply.text)
        return score, (f"score {score}" if score >= 0 else f"unparsable or out-of-range reply {reply.text!r}")

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        if judge is None:
            raise InputError(
                "mmbench_video is scored by an LLM judge: run with judge=openai_compatible "
                "(or judge=fake for an offline smoke run whose scores are not MMBench-Video's)"
            )
        items: list[tuple[list[str], int]] = []
        unreachable = unparsable = 0
        for rec in records:
            score, line = self.rate(judge, rec.meta["question"], rec.answer, rec.prediction)
            unreachable += line.startswith("judge request failed")
            unparsable += line.startswith("unparsable")
            rec.extracted = score
            rec.meta["judge_score"] = score
            rec.meta["judge_log"] = line
            items.append((list(rec.meta["dimensions"]), score))
        if records and unreachable == len(records):
            raise InputError(
                f"the judge could not be reached for any of the {len(records)} items ({records[-1].meta['judge_log']})"
            )
        tables = rating_tables(items)
        return {
            **self.describe(),
            "n": len(records),
            "overall": tables["coarse_all"].get("Overall", 0.0),
            "overall_valid": tables["coarse_valid"].get("Overall"),
            "perception": tables["coarse_all"].get("Perception"),
            "reasoning": tables["coarse_all"].get("Reasoning"),
            **tables,
            "failed": sum(s < 0 for _, s in items),
            "judge": judge.describe(),
            "judge_failed": unreachable,
            "judge_unparsable": unparsable,
        }
