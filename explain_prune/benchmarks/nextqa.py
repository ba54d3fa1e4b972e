"""NExT-QA (Xiao et al. 2021): causal / temporal / descriptive questions on everyday videos, in two
task forms, registered as `nextqa_mc` and `nextqa_oe`.

Data (`root`, env `NEXTQA_ROOT`): the HF `lmms-lab/NExTQA` release lmms-eval reads —
`MC/test-00000-of-00001.parquet` (multiple choice; `video, frame_count, width, height, question,
answer, qid, type, a0..a4`, `answer` the index 0–4 of the right option) and
`OE/<split>-00000-of-00001.parquet` (open-ended, split `test` or `validation`; `video, qid,
question, answer, type, additional_ref_answer`), or the same columns as CSV (`data_file`). Videos:
`NExTVideo/<video>.mp4` (lmms-eval's layout; `.MP4` also tried).

`nextqa_mc` — prompt `lmms_nextqa_mc`: "<question>" then "A. <a0>" ... "E. <a4>", one per line and
nothing after them (lmms-eval 75571cfe lmms_eval/tasks/nextqa/utils.py `nextqa_doc_to_text_mc`;
nextqa_mc_test.yaml sets no post-prompt).  Answer rule (`answer_rule`, recorded as the extraction id):
* `lmms_parse_multi_choice` (default; utils.py L81-139 `parse_multi_choice_response`, the MMMU rule):
  strip ",.!?;:'" from the ends and pad with spaces; candidates are the letters written "(X)", else
  "X " , else "X."; with none and more than 5 words, the options whose text the answer contains
  (case-insensitive); several candidates -> the one written last; none -> a random letter.  lmms-eval
  draws it from Python's process-wide generator (seeded once per run, so the letter depends on the
  order samples are scored in); here it is drawn from a generator seeded with (`seed`, sample id), so
  the score does not depend on order or batching.  `results.json` counts the `random_fallbacks`.
* `can_infer` (the project's earlier rule): VLMEvalKit `can_infer` (`extract.extract_option_letter`),
  deterministic, an unparsed answer scores as wrong; with the post-prompt "Answer with the option's
  letter from the given choices directly." (prompt `nextqa_mc_letter_post_prompt`).
Score: accuracy in %, overall and per `type`.

`nextqa_oe` — prompt `lmms_nextqa_oe`: "<question>" + "\nAnswer a question using a short phrase or
sentence." (lmms-eval's OE post-prompt). Extraction: none. Score `nextqa_wups` (NExT-OE
`eval_oe.py`; `benchmarks/wups.py`): both texts through `remove_stop`; for types DB and DC an exact
match of the normalised texts (1/0) at both thresholds, otherwise WUPS@0 and WUPS@0.9; with an
`additional_ref_answer` the max over the two references (at the same α — lmms-eval uses α = 0 for
the second reference at @0.9, a slip not reproduced). Type TP counts as TN. Reported ×100: `overall`
= WUPS@0 over all questions (NExT-OE's "WUPS"), `wups0`/`wups9` per type (CW CH TN TC DB DC DL DO),
their C/T/D groups, and overall WUPS@0.9.
"""

from __future__ import annotations

import abc
import random
from typing import Any, Iterator, Mapping, Sequence

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.extract import (
    OPTION_LETTER_EXTRACTION_ID,
    extract_option_letter,
)
from explain_prune.benchmarks.video_base import (
    RowError,
    VideoBenchmark,
    grouped_mean,
    percent,
    text_field,
)
from explain_prune.benchmarks.wups import Wups
from explain_prune.core import InputError, Sample, sample_seed
from explain_prune.benchmarks.base import BENCHMARKS

OPTIONS = ("A", "B", "C", "D", "E")
QTYPES = ("CW", "CH", "TN", "TC", "DB", "DC", "DL", "DO")
MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
OE_POST_PROMPT = "\nAnswer a question using a short phrase or sentence."
OE_SPLITS = ("test", "validation")


class _NExTQA(VideoBenchmark):
    env_var = "NEXTQA_ROOT"
    frame_sampling = "linspace"
    video_extensions = (".mp4", ".MP4")
    required: tuple[str, ...] = ()

    @abc.abstractmethod
    def data_candidates(self) -> tuple[str, ...]:
        """Released data files to look for, relative to the root."""

    def records(self) -> Iterator[dict[str, Any]]:
        yield from self.read_records(self.data_candidates(), self.required)

    def record_id(self, rec: dict[str, Any], position: int) -> str:
        return f"{text_field(rec, 'video')}_{text_field(rec, 'qid')}"

    def base(self, rec: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
        sid = self.record_id(rec, -1)
        video = text_field(rec, "video")
        qtype = text_field(rec, "type")
        question = text_field(rec, "question").strip()
        path = self.video_path(self.root / "NExTVideo", video)
        meta = {**self.video_meta(), "video": video, "qid": text_field(rec, "qid"), "type": qtype, "question": question}
        return sid, question, str(path), meta


MC_ANSWER_RULES = {"lmms_parse_multi_choice": "lmms_parse_multi_choice_response", "can_infer": OPTION_LETTER_EXTRACTION_ID}


def parse_multi_choice(response: str, options: Mapping[str, str], fallback: random.Random) -> tuple[str, bool]:
    """lmms-eval's `parse_multi_choice_response` (see the module doc): (letter, whether it was drawn at random)."""
    choices: Sequence[str] = list(options)
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in choices if f"({c})" in response]
    bracketed, by_letter = bool(candidates), True
    if not candidates:
        candidates = [c for c in choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in options.items() if text.lower() in response.lower()]
        by_letter = False
    if not candidates:
        return fallback.choice(choices), True
    if len(candidates) == 1:
        return candidates[0], False

    def last_at(c: str) -> int:
        if not by_letter:
            return response.lower().rfind(options[c].lower())
        return response.rfind(f"({c})") if bracketed else response.rfind(f" {c} ")

    return max(candidates, key=lambda c: (last_at(c), -candidates.index(c))), False  # the first of equal maxima, as argmax


@BENCHMARKS.register("nextqa_mc")
class NExTQAMC(_NExTQA):
    max_new_tokens = 16
    required = ("video", "qid", "question", "answer", "type", "a0", "a1", "a2", "a3", "a4")

    def __init__(self, root=None, answer_rule: str = "lmms_parse_multi_choice", seed: int = 0, **kwargs: Any):
        if answer_rule not in MC_ANSWER_RULES:
            raise InputError(f"nextqa_mc: unknown answer_rule {answer_rule!r} (known: {', '.join(MC_ANSWER_RULES)})")
        super().__init__(root, **kwargs)
        self.answer_rule, self.seed = answer_rule, int(seed)
        self.extraction_id = MC_ANSWER_RULES[answer_rule]
        self.prompt_id = "lmms_nextqa_mc" if answer_rule == "lmms_parse_multi_choice" else "nextqa_mc_letter_post_prompt"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "answer_rule": self.answer_rule, "seed": self.seed}

    def parse(self, prediction: str, sample_meta: dict[str, Any]) -> tuple[str | None, bool]:
        """(letter, whether it was drawn at random) under the answer rule; the random fallback is seeded
        with (seed, sample id)."""
        if self.answer_rule == "can_infer":
            return extract_option_letter(str(prediction), sample_meta["options"]), False
        sample_id = f"{sample_meta.get('video')}_{sample_meta.get('qid')}"  # = record_id
        return parse_multi_choice(str(prediction), sample_meta["options"], random.Random(sample_seed(self.seed, sample_id)))

    def data_candidates(self) -> tuple[str, ...]:
        return ("MC/test-00000-of-00001.parquet",)

    def make_sample(self, rec: dict[str, Any]) -> Sample:
        sid, question, video, meta = self.base(rec)
        options = {letter: text_field(rec, f"a{i}").strip() for i, letter in enumerate(OPTIONS)}
        try:
            answer_index = int(float(text_field(rec, "answer")))
        except ValueError as err:
            raise RowError(f"answer {rec.get('answer')!r} is not an option index") from err
        if not 0 <= answer_index < len(OPTIONS):
            raise RowError(f"answer index {answer_index} is outside 0-4")
        answer = OPTIONS[answer_index]
        prompt = "\n".join([question] + [f"{k}. {v}" for k, v in options.items()])
        if self.answer_rule == "can_infer":
            prompt += MC_POST_PROMPT
        meta.update(options=options, answer=answer)
        return Sample(id=sid, question=prompt, video=video, answer=answer, meta=meta)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str | None:
        return self.parse(prediction, sample_meta)[0]

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        hits, drawn = [], 0
        for rec in records:
            rec.extracted, random_pick = (None, False) if rec.prediction is None else self.parse(rec.prediction, rec.meta)
            drawn += random_pick
            hits.append(int(rec.extracted is not None and rec.extracted == rec.answer))
        out = {
            **self.describe(),
            "n": len(records),
            "overall": percent(sum(hits), len(hits)),
            "types": grouped_mean(((r.meta.get("type"), h) for r, h in zip(records, hits)), 100.0),
            "unextracted": sum(r.extracted is None for r in records),
        }
        if self.answer_rule == "lmms_parse_multi_choice":
            out["random_fallbacks"] = drawn
        return out


@BENCHMARKS.register("nextqa_oe")
class NExTQAOE(_NExTQA):
    prompt_id = "lmms_nextqa_oe"
    extraction_id = "nextqa_wups"
    max_new_tokens = 32
    required = ("video", "qid", "question", "answer", "type")

    def __init__(self, root=None, split: str = "test", wordnet_path: str | None = None, pos_tagger: str = "auto", **kwargs: Any):
        super().__init__(root, **kwargs)
        if split not in OE_SPLITS:
            raise InputError(f"nextqa_oe: unknown split {split!r} (known: {', '.join(OE_SPLITS)})")
        self.split = split
        self.wordnet_path = wordnet_path
        self.pos_tagger = pos_tagger
        self._wups: Wups | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split": self.split}

    def data_candidates(self) -> tuple[str, ...]:
        return (f"OE/{self.split}-00000-of-00001.parquet",)

    @property
    def metric(self) -> Wups:
        if self._wups is None:
            self._wups = Wups.from_path(self.wordnet_path, tagger=self.pos_tagger)
        return self._wups

    def make_sample(self, rec: dict[str, Any]) -> Sample:
        sid, question, video, meta = self.base(rec)
        answer = text_field(rec, "answer")
        meta.update(answer=answer, additional_ref_answer=text_field(rec, "additional_ref_answer", required=False))
        return Sample(id=sid, question=question + OE_POST_PROMPT, video=video, answer=answer, meta=meta)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return str(prediction)

    def item_scores(self, prediction: str, answer: str, qtype: str, extra: str | None) -> tuple[float, float]:
        """(WUPS@0, WUPS@0.9) of one answer, NExT-OE `eval_oe.py` rules."""
        m = self.metric
        pred = m.remove_stop(prediction)
        refs = [m.remove_stop(answer)] + ([m.remove_stop(extra)] if extra else [])
        if qtype in ("DB", "DC"):
            exact = float(any(pred == r for r in refs))
            return exact, exact
        return max(m.score(pred, r, 0.0) for r in refs), max(m.score(pred, r, 0.9) for r in refs)

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        rows = []
        for rec in records:
            qtype = rec.meta["type"]
            qtype = "TN" if qtype == "TP" else qtype
            if qtype not in QTYPES:
                raise InputError(f"nextqa_oe: record {rec.id} has unknown question type {qtype!r}")
            pred = "" if rec.prediction is None else str(rec.prediction)
            w0, w9 = self.item_scores(pred, str(rec.answer), qtype, rec.meta.get("additional_ref_answer"))
            rec.extracted = {"wups0": w0, "wups9": w9}
            rows.append((qtype, w0, w9))
        n = len(rows)
        wups0 = grouped_mean(((t, w0) for t, w0, _ in rows), 100.0)
        wups9 = grouped_mean(((t, w9) for t, _, w9 in rows), 100.0)
        groups = grouped_mean(((t[0], w0) for t, w0, _ in rows), 100.0)
        return {
            **self.describe(),
            **self.metric.describe(),
            "n": n,
            "overall": 100.0 * sum(w0 for _, w0, _ in rows) / n if n else 0.0,
            "wups9_overall": 100.0 * sum(w9 for _, _, w9 in rows) / n if n else 0.0,
            "wups0": {t: wups0[t] for t in QTYPES if t in wups0},
            "wups9": {t: wups9[t] for t in QTYPES if t in wups9},
            "wups0_groups": {g: groups[g] for g in ("C", "T", "D") if g in groups},
        }
