"""The App. B correctness filter: keep only samples the MLLM answered correctly.

`is_correct(prediction, reference, question_meta) -> bool` decides with the first rule that
applies (`question_meta` is the sample's meta; the sources set `answer_type`, `options` and
`answer_letter`):

1. Multiple choice — `question_meta["options"]` is a non-empty {letter: text} mapping and the
   reference letter is known (`answer_letter`, else the letter the reference starts with: "B",
   "(B)", "B. cat"): correct iff `extract_choice(prediction, options)` is that letter.
   `extract_choice` tries, in order:
     a. a leading letter: "B", "b", "(B)", "[B]", "B.", "B)", "B:", "B," (an uppercase letter
        followed by a space and a word, like "A cat", is not a leading letter: it reads as the
        article);
     b. an announced letter: "answer is B", "Answer: (B)", "option B", "choice: B" (the first one
        that is an option letter);
     c. VLMEvalKit's `can_infer` (benchmarks.extract.extract_option_letter, reused): exactly one
        standalone option letter, else exactly one option text contained in the answer.  When
        the one letter found is a leading "A" followed by a lower-case word ("A cat"), it may be
        the article: if the text without it picks an option (by letter or text), that option wins.
   Nothing inferable, a refusal or two letters ("A or B") is wrong.
2. Yes/no — the normalised reference is "yes" or "no": correct iff VLMEvalKit's yes/no
   extraction (benchmarks.extract.extract_yes_no) of the prediction equals it.
3. Short answer — the normalised reference has at most SHORT_ANSWER_WORDS words: correct iff the
   normalised prediction equals it, or is a sentence of at most SHORT_PREDICTION_WORDS words that
   contains it as a whole-word span AND names no other candidate of `question_meta["answers"]`
   (the closed answer set, when the task has one).  The length cap keeps a long ramble that
   happens to contain the word from counting as an answer.
4. Long free-form answer (more words): correct iff the token F1 (SQuAD style, on normalised
   tokens) between prediction and reference is at least `question_meta.get("f1_threshold",
   F1_THRESHOLD)`.  String overlap is only a proxy for a long answer; a judge model is the faithful
   alternative (benchmarks.judge), plugged in by the caller.

Normalisation (`normalize_answer`): lower-case; "1,000" -> "1000"; punctuation -> space (a
decimal point between digits is kept); the articles a / an / the dropped; number words zero ...
twenty, thirty ... ninety, hundred and "none" (VQA's rule) -> digits; whitespace collapsed.

How many samples are dropped, and whether that is reported, is the caller's business.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Mapping, Sequence

from explain_prune.benchmarks.extract import extract_option_letter, extract_yes_no

SHORT_ANSWER_WORDS = 3
SHORT_PREDICTION_WORDS = 12
F1_THRESHOLD = 0.5
CORRECTNESS_RULE_ID = "app_b_v1"  # names this rule set (recorded next to cached samples by callers)

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19",
    "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
    "eighty": "80", "ninety": "90", "hundred": "100",
}
_PUNCT = set(string.punctuation) | set("“”‘’«»–—…·")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?=[.):,]|\s*$)|([a-z])(?=[.):]?\s*$))")
# The keyword is case-insensitive, the letter is not ("the answer is a dog" announces nothing).
_ANNOUNCED_LETTER = re.compile(r"\b(?i:answer|option|choice)(?i:\s+is)?\s*[:\-]?\s*[\(\[]?([A-Z])(?![A-Za-z])")
_ARTICLE_A = re.compile(r"^\s*A\s+(?=[a-z])")


def normalize_answer(text: str) -> str:
    """The normalised form used by the short-answer and F1 rules (module docstring)."""
    text = _DIGIT_COMMA.sub("", str(text).lower())
    text = _DECIMAL.sub("\0", text)  # protect decimal points
    text = "".join(" " if ch in _PUNCT else ch for ch in text).replace("\0", ".")
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def extract_choice(prediction: str, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None (rules a-c of the module docstring)."""
    letters = list(options.keys()) if isinstance(options, Mapping) else [str(x) for x in options]
    text = str(prediction).strip()
    if not text:
        return None
    match = _LEADING_LETTER.match(text)
    if match:
        letter = next(g for g in match.groups() if g).upper()
        if letter in letters:
            return letter
    for match in _ANNOUNCED_LETTER.finditer(text):
        letter = match.group(1)
        if letter in letters:
            return letter
    fallback = extract_option_letter(text, options)
    if fallback == "A" and _ARTICLE_A.match(text):  # "A cat": the only letter may be the article
        by_text = extract_option_letter(_ARTICLE_A.sub("", text, count=1), options)
        if by_text in letters:
            fallback = by_text
    return fallback if fallback in letters else None


def _reference_letter(reference: str, options: Mapping[str, str], meta: Mapping[str, Any]) -> str | None:
    letter = meta.get("answer_letter")
    if isinstance(letter, str) and letter in options:
        return letter
    match = _LEADING_LETTER.match(str(reference))
    if match:
        letter = next(g for g in match.groups() if g).upper()
        if letter in options:
            return letter
    norm = normalize_answer(reference)  # the reference is an option's text
    hits = [k for k, v in options.items() if normalize_answer(v) == norm]
    return hits[0] if len(hits) == 1 else None


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_correct(prediction: str, reference: str, question_meta: Mapping[str, Any] | None = None) -> bool:
    """Whether `prediction` answers like `reference` (rules 1-4 of the module docstring)."""
    meta = question_meta or {}
    prediction, reference = str(prediction), str(reference)
    options = meta.get("options")
    if isinstance(options, Mapping) and options:
        ref_letter = _reference_letter(reference, options, meta)
        if ref_letter is not None:
            return extract_choice(prediction, options) == ref_letter
    ref = normalize_answer(reference)
    pred = normalize_answer(prediction)
    if ref in ("yes", "no"):
        return extract_yes_no(prediction).lower() == ref
    if len(ref.split()) <= SHORT_ANSWER_WORDS:
        if pred == ref:
            return True
        if len(pred.split()) > SHORT_PREDICTION_WORDS or not _contains(pred, ref):
            return False
        others = [normalize_answer(a) for a in meta.get("answers") or [] if normalize_answer(a) != ref]
        return not any(_contains(pred, other) for other in others)
    threshold = float(meta.get("f1_threshold", F1_THRESHOLD))
    return token_f1(prediction, reference) >= threshold


__all__ = ["CORRECTNESS_RULE_ID", "extract_choice", "is_correct", "normalize_answer", "token_f1"]
