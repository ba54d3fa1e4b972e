"""Answer-extraction rules shared by the image and video benchmarks.

Both rules reproduce VLMEvalKit's exact-matching behaviour (the toolkit the paper evaluated with),
re-implemented here from the documented rules:

* `extract_yes_no` — VLMEvalKit `YOrN_Extraction` (vlmeval/dataset/utils/yorn.py): lower-case the
  answer, apply the VQA-eval punctuation normalisation (`vqa_normalize_punctuation`), split on
  whitespace; "Yes" if the word "yes" occurs and "no" does not, "No" for the converse, otherwise
  "Unknown" (which scores as wrong).
* `extract_option_letter` — VLMEvalKit `can_infer` (vlmeval/utils/matching_util.py) under the
  `exact_matching` policy: first look for exactly one standalone option letter (after turning
  `.()[],:;!*#{}` into spaces), then for exactly one option *text* contained in the answer. A
  refusal phrase maps to "Z"; nothing inferable gives None. Both count as wrong.

Extraction ids (recorded in results.json by the benchmarks that use them) name these rules.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

YES_NO_EXTRACTION_ID = "vlmeval_yorn"
OPTION_LETTER_EXTRACTION_ID = "vlmeval_can_infer"

# --- Yes / No -------------------------------------------------------------------------------

# The VQA-v2 evaluation punctuation list (the one VLMEvalKit's `process_punctuation` uses).
# Apostrophes, colons and periods are not in it: periods get their own rule below.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Written as in the VQA tool: `(?!<=\d)` is a (harmless) negative lookahead, so the effective rule
# is "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The VQA tool passes `re.UNICODE` (= 32) positionally as the *count* of `sub`, so only the first
# 32 such periods are removed. Kept for fidelity: it only matters for answers with > 32 periods.
_PERIOD_SUB_COUNT = 32


def vqa_normalize_punctuation(text: str) -> str:
    """VQA-eval punctuation rule: each listed mark is deleted when it touches a space somewhere in the
    text (or the text has a digit,digit group), otherwise replaced by a space; then periods that are
    not followed by a digit are deleted."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _VQA_PUNCT:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_SUB_COUNT)


def extract_yes_no(prediction: str) -> str:
    """'Yes', 'No' or 'Unknown' from a free-form answer (VLMEvalKit `YOrN_Extraction` semantics).

    >>> extract_yes_no("Yes, there is a dog.")
    'Yes'
    >>> extract_yes_no("No.")
    'No'
    >>> extract_yes_no("Yes and no.")
    'Unknown'
    """
    words = vqa_normalize_punctuation(str(prediction).lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "Yes"
    if has_no and not has_yes:
        return "No"
    return "Unknown"


# --- option letters -------------------------------------------------------------------------

_LETTER_SEPARATORS = ".()[],:;!*#{}"
# VLMEvalKit maps these refusals to the pseudo-option "Z" (always wrong).
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def _letter_tokens(prediction: str) -> list[str]:
    text = prediction
    for ch in _LETTER_SEPARATORS:
        text = text.replace(ch, " ")
    return text.split()


def extract_option_letter(
    prediction: str, options: Mapping[str, str] | Sequence[str]
) -> str | None:
    """The chosen option letter, "Z" for a refusal, or None when nothing can be inferred.

    `options` maps letters to option texts ({"A": "cat", ...}); a plain sequence of letters
    disables the option-text fallback. Letters are case-sensitive, as in VLMEvalKit ("b" is not B).

    >>> extract_option_letter("(B) a dog", {"A": "cat", "B": "dog"})
    'B'
    >>> extract_option_letter("It is a dog.", {"A": "cat", "B": "dog"})
    'B'
    >>> extract_option_letter("A or B", {"A": "cat", "B": "dog"}) is None
    True
    """
    text = str(prediction)
    letters = list(options.keys()) if isinstance(options, Mapping) else [str(x) for x in options]
    if any(refusal in text for refusal in _REFUSALS):
        return "Z"
    tokens = _letter_tokens(text)
    found = [letter for letter in letters if letter in tokens]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in tokens:
        return "Z"
    if isinstance(options, Mapping):
        lowered = text.lower()
        by_text = [letter for letter, option in options.items() if str(option).lower() in lowered]
        if len(by_text) == 1:
            return by_text[0]
    return None
