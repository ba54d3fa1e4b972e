"""VLMEvalKit's LLM answer matcher through the project's judge: off by default, recorded, cached.

When exact extraction finds no answer, VLMEvalKit (e8e78f05; gpt-4o-mini as its default judge model)
asks an LLM which option the answer means, unless it runs with `exact_matching`:
* multiple choice (vlmeval/dataset/utils/multiple_choice.py `extract_answer_from_item` L359-405): only
  when `can_infer` finds nothing; the prompt of `build_prompt` (L224-241) with the options as
  `build_option_str` writes them (vlmeval/smp/vlm.py L174-179); up to 3 replies, each read with
  `can_infer`; none usable -> a random letter among the options and "Z";
* yes / no (vlmeval/dataset/utils/yorn.py `YOrN_eval` -> `YOrN_auxeval` L264-272, prompt
  `YOrN_match_prompt` L235-251): only for an "Unknown" extraction; up to 5 replies at temperature
  0.5·i, each read with the Yes/No rule; still nothing -> "Unknown".
The judge's cache (`judge.cache_dir`) keeps the replies, so a re-score sends nothing twice.  The
random letter is drawn from a generator seeded with the sample id (VLMEvalKit uses the process-wide
one), so a re-score gives the same letter.  `MatchStats` goes into the score as `llm_matcher_stats`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from explain_prune.benchmarks.extract import extract_option_letter, extract_yes_no
from explain_prune.core import sample_seed

MCQ_TRIES, YORN_TRIES = 3, 5

# The two prompt templates are the reference's inputs to its judge, pinned verbatim (as the MM-Vet grader).
MCQ_MATCH_PROMPT = (
    "You are an AI assistant who will help me to match "
    "an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, "
    "and you need to find which option is most similar to the answer. "
    "If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {}?\nOptions: {}\nAnswer: {}\nYour output: "
)
YORN_MATCH_PROMPT = (
    "You are an AI assistant who will help me to match an answer with two options of a question. "
    "The options are only Yes / No. "
    "You are provided with a question and an answer, "
    "and you need to find which option (Yes / No) is most similar to the answer. "
    "If the meaning of all options are significantly different from the answer, output Unknown. "
    "Your should output a single word among the following 3 choices: Yes, No, Unknown.\n"
    "Example 1: \n"
    "Question: Is the word in this image 'Hello'?\nAnswer: The word in this image is 'Hello'.\nYour output: Yes\n"
    "Example 2: \n"
    "Question: Is the word in this image 'Hello'?\n"
    "Answer: The word in this image is not 'Hello'.\nYour output: No\n"
    "Example 3: \n"
    "Question: {}?\nAnswer: {}\nYour output: "
)


@dataclass
class MatchStats:
    """What the matcher did in one scoring pass (the score's `llm_matcher_stats`)."""

    asked: int = 0  # answers exact extraction could not read, sent to the judge
    matched: int = 0  # of those, read from a judge reply
    random: int = 0  # multiple choice only: no usable reply, a seeded random letter
    failed_requests: int = 0

    def record(self, judge: Any) -> dict[str, Any]:
        return {**asdict(self), "judge": judge.describe()}


def option_string(options: Mapping[str, str]) -> str:
    return "There are several options: \n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())


def match_option(judge: Any, question: str, options: Mapping[str, str], prediction: str, sample_id: str,
                 stats: MatchStats) -> str:
    """The option letter (or "Z") the judge reads `prediction` as (see the module doc)."""
    stats.asked += 1
    prompt = MCQ_MATCH_PROMPT.format(question, option_string(options), prediction)
    for _ in range(MCQ_TRIES):
        reply = judge.complete(prompt)
        if not reply.ok:
            stats.failed_requests += 1
            continue
        letter = extract_option_letter(reply.text or "", options)
        if letter is not None:
            stats.matched += 1
            return letter
    stats.random += 1
    return random.Random(sample_seed(0, sample_id)).choice([*options, "Z"])


def match_yes_no(judge: Any, question: str, prediction: str, stats: MatchStats) -> str:
    """"Yes" / "No" as the judge reads `prediction`, else "Unknown" (see the module doc)."""
    stats.asked += 1
    prompt = YORN_MATCH_PROMPT.format(question, prediction)
    for attempt in range(YORN_TRIES):
        reply = judge.complete(prompt, temperature=0.5 * attempt)
        if not reply.ok:
            stats.failed_requests += 1
            continue
        answer = extract_yes_no(reply.text or "")
        if answer != "Unknown":
            stats.matched += 1
            return answer
    return "Unknown"
