"""VLMEvalKit's LLM answer matcher through the judge (benchmarks.matcher): off by default, only for answers
exact extraction cannot read, recorded in the score.  Reference facts (VLMEvalKit e8e78f05):
vlmeval/dataset/utils/multiple_choice.py L224-241 (prompt), L359-405 (3 tries, then a random letter among
the options and Z); vlmeval/smp/vlm.py L174-179 (option string); vlmeval/dataset/utils/yorn.py L235-272
(prompt; 5 tries at temperature 0.5·i, else Unknown)."""

from __future__ import annotations

import pytest

from explain_prune.benchmarks import build_benchmark
from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.judge import Judge, JudgeReply
from explain_prune.core import InputError

OPTIONS = {"A": "red", "B": "blue"}


class ScriptedJudge(Judge):
    kind, model = "scripted", "scripted"

    def __init__(self, *replies):
        self.replies, self.calls = list(replies), []

    def complete(self, prompt, *, temperature=None, max_tokens=None, fake_reply=None):
        self.calls.append((prompt, temperature))
        return JudgeReply(text=self.replies.pop(0) if self.replies else "hard to say", ok=True)


def mcq_records():
    return [Record("1", "the bluish one", "B", None, {"question": "Which colour", "options": dict(OPTIONS)}),
            Record("2", "A", "A", None, {"question": "Which colour", "options": dict(OPTIONS)})]


def test_mcq_matcher_asks_only_for_unreadable_answers_with_the_reference_prompt(tmp_path):
    bench = build_benchmark("mmstar", tmp_path, llm_matcher=True)
    judge = ScriptedJudge("The answer is B")
    records = mcq_records()
    result = bench.score(records, judge=judge)
    assert [r.extracted for r in records] == ["B", "A"] and result["overall"] == 100.0
    (prompt, _), = judge.calls  # the readable "A" is not sent
    assert prompt.startswith("You are an AI assistant who will help me to match an answer with several options")
    assert prompt.endswith("Question: Which colour?\nOptions: There are several options: \nA. red\nB. blue\n\n"
                           "Answer: the bluish one\nYour output: ")
    assert result["llm_matcher_stats"]["asked"] == result["llm_matcher_stats"]["matched"] == 1
    assert result["extraction_id"] == "vlmeval_can_infer+llm_matcher" and result["llm_matcher_stats"]["judge"]["model"] == "scripted"


def test_mcq_matcher_falls_back_to_a_seeded_random_letter_after_three_replies(tmp_path):
    bench = build_benchmark("seedbench", tmp_path, llm_matcher=True)
    judge = ScriptedJudge()
    records = mcq_records()
    result = bench.score(records, judge=judge)
    assert len(judge.calls) == 3 and result["llm_matcher_stats"]["random"] == 1
    drawn = records[0].extracted
    assert drawn in ("A", "B", "Z")
    bench.score(records, judge=ScriptedJudge())
    assert records[0].extracted == drawn  # the same letter on a re-score


def test_yes_no_matcher_retries_at_rising_temperature(tmp_path):
    for name in ("pope", "mme"):
        bench = build_benchmark(name, tmp_path, llm_matcher=True)
        judge = ScriptedJudge("Unknown", "maybe", "Yes, it is")
        meta = {"question": "Is there a cat", "category": "random", "splits": ["random"], "image_key": "1"}
        records = [Record("1", "There might be one.", "Yes", None, dict(meta))]
        result = bench.score(records, judge=judge)
        assert records[0].extracted == "Yes" and [t for _, t in judge.calls] == [0.0, 0.5, 1.0]
        assert judge.calls[0][0].endswith("Question: Is there a cat?\nAnswer: There might be one.\nYour output: ")
        assert result["llm_matcher_stats"]["matched"] == 1 and result["unknown_answers"] == 0
        never = ScriptedJudge()
        bench.score(records, judge=never)
        assert records[0].extracted == "Unknown" and len(never.calls) == 5


def test_the_matcher_is_off_by_default_and_needs_a_judge(tmp_path):
    bench = build_benchmark("mmstar", tmp_path)
    judge = ScriptedJudge("B")
    records = mcq_records()
    result = bench.score(records, judge=judge)
    assert records[0].extracted is None and not judge.calls and "llm_matcher_stats" not in result and result["llm_matcher"] is False
    assert result["extraction_id"] == "vlmeval_can_infer" and bench.describe()["llm_matcher"] is False
    with pytest.raises(InputError, match="llm_matcher=true needs a judge"):
        build_benchmark("pope", tmp_path, llm_matcher=True).score(
            [Record("1", "hmm", "Yes", None, {"question": "q", "splits": ["random"]})], judge=None)
