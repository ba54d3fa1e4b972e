"""ActivityNet-QA (Yu et al. 2019): open-ended questions on ActivityNet videos, judged by an LLM.

Data (`root`, env `ACTIVITYNETQA_ROOT`): the HF `lmms-lab/ActivityNetQA` release lmms-eval reads —
`data/test-00000-of-00001.parquet` with `video_name, question, answer, question_id, type` (the
question lower-case without "?"), and the videos as `all_test/v_<video_name>.mp4` (`.webm` and
`.mkv` are also tried, as lmms-eval does).

Prompt `lmms_activitynetqa`: the question capitalised (Python `str.capitalize`) + "?" + " Answer the
question using a single word or phrase." (lmms-eval `activitynetqa_doc_to_text` with its default
post-prompt). Frames: rule `linspace`. Extraction: none; the judge sees the raw answer.

Scoring `activitynetqa_gpt_eval` (lmms-eval `get_eval` / `parse_score` / the two aggregations): the
judge gets the Video-ChatGPT-style instructions (lmms-eval's *system* message; the project's judge
sends one user message, so they lead it) and "Please evaluate the following video-based
question-answer pair: Question: <raw question> / Correct Answer / Predicted Answer ...", temperature
0, at most 64 tokens, and must reply with a Python dict `{'pred': 'yes'|'no', 'score': int 0-5}`.
The reply is read with `ast.literal_eval`; anything unreadable, an unreachable judge or a missing
prediction counts as `('no', 0)`, as in lmms-eval (they are also counted in `judge_failed` /
`judge_unparsable`). `accuracy` = % of items whose 'pred' is exactly "yes" (= `overall`), `score` =
mean judge score over all items (0–5), both also per question `type`.
"""

from __future__ import annotations

import ast
from typing import Any, Iterator

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.judge import Judge
from explain_prune.benchmarks.video_base import (
    VideoBenchmark,
    grouped_mean,
    percent,
    text_field,
)
from explain_prune.core import InputError, Sample
from explain_prune.benchmarks.base import BENCHMARKS, normalize_text

PARQUET = "data/test-00000-of-00001.parquet"
POST_PROMPT = " Answer the question using a single word or phrase."

JUDGE_PROMPT_ID = "activitynetqa_gpt_eval"
JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


def activitynet_prompt(question: str) -> str:
    return question.capitalize() + "?" + POST_PROMPT


def judge_prompt(question: str, answer: str, prediction: str) -> str:
    return JUDGE_SYSTEM + "\n\n" + JUDGE_USER.format(question=question, answer=answer, prediction=prediction)


def parse_judgement(reply: str | None) -> tuple[str, float] | None:
    """lmms-eval `parse_score`: ('yes'|'no'|whatever 'pred' says, float score), or None when the reply
    is not a Python dict literal with a numeric score (lmms-eval then uses ('no', 0))."""
    if reply is None:
        return None
    try:
        value = ast.literal_eval(reply.strip())
        pred = value.get("pred", "no")
        score = float(value.get("score", 0))
    except (ValueError, SyntaxError, TypeError, AttributeError, MemoryError, RecursionError):
        return None
    return str(pred), score


def rule_judgement(answer: str, prediction: str) -> str:
    """Offline stand-in for `FakeJudge` (NOT the benchmark's metric): yes/5 if the normalised answer
    occurs in the normalised prediction, else no/0."""
    a, p = normalize_text(answer), normalize_text(prediction)
    hit = bool(a) and a in p
    return repr({"pred": "yes" if hit else "no", "score": 5 if hit else 0})


@BENCHMARKS.register("activitynetqa")
class ActivityNetQA(VideoBenchmark):
    env_var = "ACTIVITYNETQA_ROOT"
    prompt_id = "lmms_activitynetqa"
    extraction_id = JUDGE_PROMPT_ID
    needs_judge = True
    frame_sampling = "linspace"
    max_new_tokens = 64
    video_extensions = (".mp4", ".webm", ".mkv")

    def __init__(self, root=None, judge_max_tokens: int | None = 64, **kwargs: Any):
        super().__init__(root, **kwargs)
        self.judge_max_tokens = None if judge_max_tokens is None else int(judge_max_tokens)

    def records(self) -> Iterator[dict[str, Any]]:
        yield from self.read_records((PARQUET,), ("video_name", "question", "answer", "question_id"))

    def record_id(self, rec: dict[str, Any], position: int) -> str:
        return text_field(rec, "question_id")

    def make_sample(self, rec: dict[str, Any]) -> Sample:
        sid = self.record_id(rec, -1)
        raw_question = text_field(rec, "question")
        answer = text_field(rec, "answer")
        video_name = text_field(rec, "video_name")
        path = self.video_path(self.root / "all_test", f"v_{video_name}")
        meta = {
            **self.video_meta(),
            "question_id": sid,
            "video_name": video_name,
            "question": raw_question,
            "answer": answer,
            "type": text_field(rec, "type", required=False),
        }
        return Sample(id=sid, question=activitynet_prompt(raw_question), video=str(path), answer=answer, meta=meta)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return str(prediction)

    def judge_item(self, judge: Judge, question: str, answer: str, prediction: str | None) -> tuple[str, float, str]:
        """(pred, score, log) for one item; failures are ('no', 0.0) as in lmms-eval."""
        if prediction is None:
            return "no", 0.0, "no prediction"
        reply = judge.complete(
            judge_prompt(question, answer, prediction),
            temperature=0.0,
            max_tokens=self.judge_max_tokens,
            fake_reply=lambda: rule_judgement(answer, prediction),
        )
        if not reply.ok:
            return "no", 0.0, f"judge request failed: {reply.error}"
        parsed = parse_judgement(reply.text)
        if parsed is None:
            return "no", 0.0, f"unparsable reply {reply.text!r}"
        return parsed[0], parsed[1], f"pred {parsed[0]!r} score {parsed[1]}"

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        if judge is None:
            raise InputError(
                "activitynetqa is scored by an LLM judge: run with judge=openai_compatible "
                "(or judge=fake for an offline smoke run whose scores are not ActivityNet-QA's)"
            )
        rows = []
        unreachable = unparsable = 0
        for rec in records:
            pred, value, line = self.judge_item(judge, rec.meta["question"], str(rec.answer), rec.prediction)
            unreachable += line.startswith("judge request failed")
            unparsable += line.startswith("unparsable")
            rec.extracted = {"pred": pred, "score": value}
            rec.meta["judge_log"] = line
            rows.append((rec.meta.get("type"), pred == "yes", value))
        if records and unreachable == len(records):
            raise InputError(
                f"the judge could not be reached for any of the {len(records)} items ({records[-1].meta['judge_log']})"
            )
        n = len(rows)
        accuracy = percent(sum(ok for _, ok, _ in rows), n)
        return {
            **self.describe(),
            "n": n,
            "overall": accuracy,
            "accuracy": accuracy,
            "score": sum(v for _, _, v in rows) / n if n else 0.0,
            "type_accuracy": grouped_mean(((t, ok) for t, ok, _ in rows), 100.0),
            "type_score": grouped_mean(((t, v) for t, _, v in rows)),
            "judge": judge.describe(),
            "judge_failed": unreachable,
            "judge_unparsable": unparsable,
        }
