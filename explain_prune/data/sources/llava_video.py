"""LLaVA-Video-178K video QA (lmms-lab/LLaVA-Video-178K), incl. its NExT-QA and ActivityNet-QA parts.

Release layout (the dataset card's configs; docs/data.md): one directory per *data source*
`<duration>_<source>` — durations 0_30_s, 30_60_s, 1_2_m, 2_3_m; sources academic_v0_1 and
youtube_v0_1 (the LLaVA-Video-178K data proper), nextqa, activitynet / activitynetqa,
perceptiontest — holding `*_oe_*qa_processed.json` (open-ended), `*_mc_*qa_processed.json`
(multiple choice) and `*_cap_*processed.json` (captions) annotation files (parquet exports name the
task the same way, e.g. `0_30_s_academic_mc-00000-of-00001.parquet`) and the video tarballs.
A record: {"id", "conversations": [{"from": "human", "value": "<image>\\nQuestion?\\nOptions:\\n
A. ...\\n..."}, {"from": "gpt", "value": "E. training."}], "data_source": "0_30_s_nextqa",
"video": "NextQA/NExTVideo/1006/8968804598.mp4"}.

* Files: data.annotation (file or list, relative to root) or, when null, every annotation file at
  depth <= 1 under the root whose name carries a task token (`_oe_`, `_mc_`, `_cap_`).
* Task: from the file name; for a file without a task token (a merged file) from the record —
  multiple choice when the question lists options and the reference starts with one's letter.
  `tasks` keeps the given tasks (default oe and mc: App. B samples "open-ended and multi-choice";
  captions have no short reference to check an answer against).
* Part (the unit App. B balances): `<data_source>/<task>`, e.g. `30_60_s_youtube_v0_1/mc`; the
  record's `data_source`, else the file's directory name.  Group: `llava_video` for the academic
  and youtube sources, `nextqa`, `activitynetqa` (activitynet and activitynetqa), `perceptiontest`.
* `subsets` keeps rows whose group, data_source or source (`academic`, `youtube`, ...) is listed.
  `balanced_per_part: n` keeps n rows of every part; `group_totals` ({llava_video: 7000, nextqa:
  6000, activitynetqa: 4000} reproduces App. B) splits each group's total equally over its
  parts; both draw deterministically by `seed` (common.select_entries).  `limit` keeps the first n.
* Video: the `video` path is tried relative to the root, to `<root>/<data_source>/` (where the
  tarballs extract) and to the annotation file's directory; a missing file is a SampleError.
  The Sample carries the path; the adapter decodes frames (data.video.read_frames), so an
  unreadable video is the adapter's InputError, counted as a skip by the caller.
* Sample: the FIRST human turn (markers removed; options kept in the text, as the model sees them)
  and the first gpt answer (later turns dropped, common.first_turn); multiple-choice rows carry
  `options` and `answer_letter` in meta for the correctness filter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explain_prune.core import InputError, Sample
from explain_prune.data.sources.common import (
    SOURCES,
    ANNOTATION_SUFFIXES,
    Entry,
    RowError,
    Source,
    annotation_paths,
    answer_meta,
    first_existing,
    first_turn,
    name_list,
    read_rows,
    record_ids,
    dataset_root,
    select,
)

TASKS = ("oe", "mc", "cap")
DEFAULT_TASKS = ("oe", "mc")
DATA_SOURCE_RE = re.compile(r"^(\d+_\d+_[sm])_(.+)$")
TASK_TOKEN_RE = re.compile(r"(?:^|_)(oe|mc|cap)(?=_|-|\.|$)")
VERSION_RE = re.compile(r"_v\d+_\d+$")


def file_task(path: Path) -> str | None:
    """oe / mc / cap from an annotation file name, None when the name has no task token."""
    match = TASK_TOKEN_RE.search(path.stem)
    return match.group(1) if match else None


def split_data_source(data_source: str) -> tuple[str | None, str]:
    """('0_30_s', 'nextqa') from '0_30_s_nextqa'; the version suffix `_v0_1` is dropped."""
    match = DATA_SOURCE_RE.match(data_source)
    duration, source = (match.group(1), match.group(2)) if match else (None, data_source)
    return duration, VERSION_RE.sub("", source)


def group_of(source: str) -> str:
    if source in ("academic", "youtube"):
        return "llava_video"
    if source.startswith("activitynet"):
        return "activitynetqa"
    return source


def infer_task(record: dict[str, Any]) -> str:
    try:
        turn = first_turn(record.get("conversations"))
    except RowError:
        return "oe"  # the row error is reported when the sample is made
    return "mc" if answer_meta(turn.question, turn.answer)["answer_type"] == "multiple_choice" else "oe"


@SOURCES.register("llava_video")
class LLaVAVideoSource(Source):

    def __init__(
        self,
        root: str | Path | None,
        annotation: str | Sequence[str] | None = None,
        subsets: Sequence[str] | None = None,
        tasks: Sequence[str] | None = DEFAULT_TASKS,
        balanced_per_part: int | None = None,
        group_totals: dict[str, int] | None = None,
        limit: int | None = None,
        seed: int = 0,
    ):
        path = dataset_root(root, self.name)
        task_list = name_list(list(tasks) if tasks is not None else list(DEFAULT_TASKS), "data.tasks") or []
        bad = sorted(set(task_list) - set(TASKS))
        if bad:
            raise InputError(f"llava_video: unknown task(s) {bad}; known: {list(TASKS)}")
        explicit = annotation_paths(path, annotation, self.name)
        files = explicit if explicit else self._scan(path, task_list)
        entries = [e for e in self._entries(path, files) if e.extra["task"] in task_list]
        wanted = name_list(subsets, "data.subsets")
        if wanted is not None:
            names = sorted({n for e in entries for n in e.extra["names"]})
            unknown = sorted(set(wanted) - set(names))
            if unknown:
                raise InputError(f"llava_video: unknown subset(s) {unknown}; present: {names}")
            keep = set(wanted)
            entries = [e for e in entries if keep & e.extra["names"]]
        entries, selection = select(entries, balanced_per_part, group_totals, limit, seed)
        options = {
            "annotation": [str(f) for f in explicit] if explicit else None,
            "files": [f.relative_to(path).as_posix() if f.is_relative_to(path) else str(f) for f in files],
            "subsets": wanted,
            "tasks": task_list,
            **selection,
        }
        super().__init__(path, entries, options)

    @staticmethod
    def _scan(root: Path, tasks: list[str]) -> list[Path]:
        found = [
            p for pattern in ("*", "*/*") for p in root.glob(pattern)
            if p.is_file() and p.suffix.lower() in ANNOTATION_SUFFIXES and file_task(p) is not None
        ]
        files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise InputError(
                f"llava_video: no annotation files (*_oe_*, *_mc_*, *_cap_* .json/.jsonl/.parquet) in {root} or its "
                f"sub-directories (point data.root at the LLaVA-Video-178K download, or set data.annotation)"
            )
        return [p for p in files if file_task(p) in tasks]

    def _entries(self, root: Path, files: list[Path]) -> list[Entry]:
        entries = []
        for file in files:
            task_from_name = file_task(file)
            directory = file.parent.name if file.parent != root else file.stem
            rows = read_rows(file)
            ids = record_ids([record for record, _ in rows], file.stem)
            shared: dict[tuple[str, str], dict[str, Any]] = {}  # one info dict per (data_source, task)
            for row, ((record, error), sid) in enumerate(zip(rows, ids)):
                data_source = str((record or {}).get("data_source") or directory)
                task = task_from_name or (infer_task(record) if record is not None else "oe")
                info = shared.get((data_source, task))
                if info is None:
                    duration, source = split_data_source(data_source)
                    group = group_of(source)
                    info = shared[(data_source, task)] = {
                        "task": task, "task_from_name": task_from_name is not None, "data_source": data_source,
                        "duration": duration, "video_source": source, "group": group, "dir": file.parent,
                        "part": f"{data_source}/{task}", "names": frozenset({group, data_source, source}),
                    }
                entries.append(Entry(
                    id=sid, part=info["part"], group=info["group"], where=f"{file.name} row {row}",
                    record=record, error=error, extra=info,
                ))
        return entries

    def make_sample(self, entry: Entry) -> Sample:
        assert entry.record is not None
        record, extra = entry.record, entry.extra
        turn = first_turn(record.get("conversations"))
        multiple_choice = (extra["task"] == "mc") if extra["task_from_name"] else None
        answer = answer_meta(turn.question, turn.answer, multiple_choice)
        video = self._video(record.get("video"), extra)
        meta: dict[str, Any] = {
            "source": self.name,
            "data_source": extra["data_source"],
            "duration": extra["duration"],
            "video_source": extra["video_source"],
            "group": entry.group,
            "task": extra["task"],
            "part": entry.part,
            "where": entry.where,
            "record_id": None if record.get("id") is None else str(record.get("id")),
            "num_turns": turn.num_turns,
            **answer,
        }
        return Sample(id=entry.id, question=turn.question, video=str(video), answer=turn.answer, meta=meta)

    def _video(self, value: Any, extra: dict[str, Any]) -> Path:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str) or not value.strip():
            raise RowError("record has no 'video' path")
        rel = Path(value.strip())
        if rel.is_absolute():
            candidates = [rel]
        else:
            candidates = []
            for base in (self.root, self.root / extra["data_source"], extra["dir"]):
                if base / rel not in candidates:
                    candidates.append(base / rel)
        found = first_existing(candidates)
        if found is None:
            raise RowError(f"video file not found (tried {', '.join(str(p) for p in candidates)})")
        return found


__all__ = ["TASKS", "LLaVAVideoSource", "file_task", "group_of", "split_data_source"]
