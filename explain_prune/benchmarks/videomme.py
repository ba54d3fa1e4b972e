"""Video-MME (Fu et al. 2024), without subtitles: 2,700 four-way multiple-choice questions on 900
videos, short (< 2 min) / medium (4–15 min) / long (30–60 min).

Data (`root`, env `VIDEOMME_ROOT`), either release:
* HF `lmms-lab/Video-MME`: `videomme/test-00000-of-00001.parquet` with `video_id, duration, domain,
  sub_category, url, videoID, question_id, task_type, question, options, answer`; `options` holds
  the four strings "A. ...", ..., `answer` the letter. Videos (unzipped) as `data/<videoID>.mp4`
  (lmms-eval's layout; `.MP4` and `.mkv` are also tried), or `video/<videoID>.mp4` (VLMEvalKit's).
* VLMEvalKit's `Video-MME.tsv` (generated from that parquet): `index, video, video_path, duration,
  domain, candidates, sub_category, task_type, subtitle_path, question, answer`, with `candidates`
  a list literal of the "A. ..." strings and `video_path` relative to the root ("./video/<id>.mp4").

Prompt `vlmeval_videomme_nosub` (VLMEvalKit e8e78f05 vlmeval/dataset/videomme.py L46-50 and
L227-238): the message is `SYS` (empty), the video, `FRAMES_TMPL_NOSUB` — "\nThese are the frames of a
video. Select the best answer to the following multiple-choice question based on the video. Respond
with only the letter (A, B, C, or D) of the correct option.\n", with its leading and trailing newline —
and "Question: <question>\n<the four option lines>\nAnswer: " with its trailing space.  The texts are
concatenated as the models read them, kept verbatim; every family puts them after the video.

Frames: rule `interior` (VLMEvalKit `save_video_frames`: indices int(i·(T/(n+1))), i = 1..n).

Extraction `videomme_regex` (VLMEvalKit / lmms-eval `extract_characters_regex`): strip, delete the
answer prefixes, "" if the text has more than 10 words and no capital A–D, else the first capital
A–D anywhere in it. Under VLMEvalKit's exact-matching policy an empty extraction cannot be rescued
(the question field holds no options), so it scores 0.

Scoring (VLMEvalKit `get_dimension_rating`): score = 1 if extracted == answer else 0; a record with
no prediction at all scores −1 and is excluded from every mean ("valid" rating). Means are reported
in % overall, per duration, and per domain, sub_category and task_type — over all durations and
within each duration (`by_duration`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from explain_prune.benchmarks.base import Record
from explain_prune.benchmarks.video_base import (
    RowError,
    VideoBenchmark,
    grouped_mean,
    list_field,
    text_field,
)
from explain_prune.core import Sample
from explain_prune.benchmarks.base import BENCHMARKS

DURATIONS = ("short", "medium", "long")
LETTERS = ("A", "B", "C", "D")
PARQUET = "videomme/test-00000-of-00001.parquet"
TSV = "Video-MME.tsv"

FRAMES_TMPL_NOSUB = (
    "These are the frames of a video. "
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)

# VLMEvalKit's list, including its two missing commas: "The best option is" + "The correct option is"
# and "Best answer:" + "Best option:" are each ONE concatenated prefix there. Kept for fidelity.
_ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
    "Answer:",
    "Option:",
)
_LETTER = re.compile(r"[ABCD]")


def extract_characters_regex(prediction: str) -> str:
    """Video-MME's answer rule: the first capital A–D after removing the answer prefixes ("" if none,
    or if the answer is longer than 10 words and contains no A–D)."""
    s = str(prediction).strip()
    for prefix in _ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not _LETTER.search(s):
        return ""
    match = _LETTER.search(s)
    return match.group(0) if match else ""


def required_columns(columns: set[str]) -> tuple[str, ...]:
    """Two released layouts: the parquet's videoID/options and the TSV's video/candidates."""
    layout = ("videoID", "options") if "options" in columns or "videoID" in columns else ("video", "candidates")
    return ("question", "answer", "duration", "domain", "task_type", *layout)


def videomme_prompt(question: str, options: list[str]) -> str:
    return "\n" + FRAMES_TMPL_NOSUB + "\n" + "Question: " + question + "\n" + "\n".join(options) + "\nAnswer: "


@BENCHMARKS.register("videomme")
class VideoMME(VideoBenchmark):
    env_var = "VIDEOMME_ROOT"
    prompt_id = "vlmeval_videomme_nosub"
    extraction_id = "videomme_regex"
    frame_sampling = "interior"
    max_new_tokens = 16
    video_extensions = (".mp4", ".MP4", ".mkv")

    def records(self) -> Iterator[dict[str, Any]]:
        yield from self.read_records((PARQUET, TSV), required_columns)

    def record_id(self, rec: dict[str, Any], position: int) -> str:
        for key in ("question_id", "index"):
            value = text_field(rec, key, required=False)
            if value is not None:
                return value
        return str(position)

    def make_sample(self, rec: dict[str, Any]) -> Sample:
        sid = self.record_id(rec, -1)
        video_id = text_field(rec, "videoID", required=False) or text_field(rec, "video")
        options = list_field(rec["options"] if "options" in rec else rec.get("candidates"), "options")
        if len(options) != 4:
            raise RowError(f"expected 4 options, got {len(options)}")
        answer = text_field(rec, "answer").strip()
        if answer not in LETTERS:
            raise RowError(f"answer {answer!r} is not one of A-D")
        duration = text_field(rec, "duration")
        if duration not in DURATIONS:
            raise RowError(f"duration {duration!r} is not one of {DURATIONS}")
        video = self._video(rec, video_id)
        question = text_field(rec, "question")
        meta = {
            **self.video_meta(),
            "question_id": sid,
            "videoID": video_id,
            "duration": duration,
            "domain": text_field(rec, "domain"),
            "sub_category": text_field(rec, "sub_category", required=False),
            "task_type": text_field(rec, "task_type"),
            "question": question,
            "options": options,
            "answer": answer,
        }
        return Sample(id=sid, question=videomme_prompt(question, options), video=str(video), answer=answer, meta=meta,
                      verbatim=True)

    def _video(self, rec: dict[str, Any], video_id: str) -> Path:
        if self.video_dir_override is None:
            rel = text_field(rec, "video_path", required=False)  # VLMEvalKit TSV: "./video/<id>.mp4"
            if rel is not None and (self.root / rel).is_file():
                return self.root / rel
        return self.video_path([self.root / "data", self.root / "video"], video_id)

    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> str:
        return extract_characters_regex(prediction)

    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        scores: list[int] = []
        for rec in records:
            if rec.prediction is None:
                rec.extracted = None
                scores.append(-1)
                continue
            rec.extracted = self.extract(rec.prediction, rec.meta)
            scores.append(int(rec.extracted == rec.answer))
        valid = [(rec, s) for rec, s in zip(records, scores) if s >= 0]

        def breakdown(items: list[tuple[Record, int]]) -> dict[str, Any]:
            return {
                "n": len(items),
                "overall": 100.0 * sum(s for _, s in items) / len(items) if items else 0.0,
                "domains": grouped_mean(((r.meta.get("domain"), s) for r, s in items), 100.0),
                "sub_categories": grouped_mean(((r.meta.get("sub_category"), s) for r, s in items), 100.0),
                "task_types": grouped_mean(((r.meta.get("task_type"), s) for r, s in items), 100.0),
            }

        overall = breakdown(valid)
        by_duration = {
            d: breakdown([(r, s) for r, s in valid if r.meta.get("duration") == d])
            for d in DURATIONS
            if any(r.meta.get("duration") == d for r, _ in valid)
        }
        return {
            **self.describe(),
            "n": len(records),
            "failed": sum(s < 0 for s in scores),
            "unextracted": sum(r.extracted == "" for r in records),
            "overall": overall["overall"],
            "durations": {d: v["overall"] for d, v in by_duration.items()},
            "domains": overall["domains"],
            "sub_categories": overall["sub_categories"],
            "task_types": overall["task_types"],
            "by_duration": by_duration,
        }
