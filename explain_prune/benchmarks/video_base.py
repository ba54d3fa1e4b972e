"""Plumbing shared by the video benchmarks (Video-MME, MVBench, MMBench-Video, NExT-QA, ActivityNet-QA).

* Data root: the `root` given to the constructor (the benchmark config's `root`), else the
  benchmark's documented environment variable (`VIDEOMME_ROOT`, `MVBENCH_ROOT`, ...); with neither
  the benchmark cannot be built (`InputError`).
* Data files: each benchmark names the released file(s) it reads, relative to the root; a missing
  file is an `InputError` naming the file(s) and the directory searched. `data_file` overrides the
  search with an explicit path. Tables are read with pandas (parquet needs pyarrow; TSV cells are
  read as strings, only empty cells are missing; JSON is a list of records).
* Videos: looked up by name under the benchmark's video directory (`video_dir` overrides it), trying
  the released extensions in order. A missing video is a `SampleError` with the paths tried — it is
  counted by the evaluator, never a crash.
* Frames: a `Sample` carries the video *path*; the adapter decodes it with
  `data.video.read_sample_frames(path, num_frames, sample.meta, ...)`, which applies
  `meta["frame_sampling"]` — the benchmark's pinned sampling rule (overridable by config) — inside
  the clip bounds `meta["start"]`/`meta["end"]` (seconds; only MVBench's bound tasks set them).
  `num_frames` comes from the modality config; the benchmark records it (and the rule) in
  `describe()` so results say what was run.
"""

from __future__ import annotations

import abc
import ast
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd

from explain_prune.benchmarks.base import Benchmark, require_columns
from explain_prune.core import InputError, RowError, Sample, SampleError, resolve_data_root
from explain_prune.core.sample import require_question
from explain_prune.benchmarks.base import percent  # noqa: F401  (re-exported to the benchmark modules)
from explain_prune.data.video import SAMPLING_RULES


# --- small value helpers ------------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """None, NaN / pandas NA or an empty / whitespace-only string."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def text_field(rec: dict[str, Any], key: str, required: bool = True) -> str | None:
    """`rec[key]` as a string; RowError if required and missing."""
    value = rec.get(key)
    if is_missing(value):
        if required:
            raise RowError(f"record has no '{key}'")
        return None
    if isinstance(value, float) and value.is_integer():  # ids read as floats from a CSV with gaps
        value = int(value)
    return str(value)


def list_field(value: Any, what: str) -> list[str]:
    """A list of strings from a parquet array / Python list / list literal string ("['a', 'b']")."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise RowError(f"'{what}' is not a list literal: {text[:80]!r} ({err})") from err
    if hasattr(value, "tolist"):  # numpy array from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"'{what}' must be a non-empty list, got {type(value).__name__}")
    return [str(v) for v in value]


# --- files ----------------------------------------------------------------------------------------


def find_data_file(root: Path, candidates: Sequence[str], benchmark: str, data_file: str | Path | None = None) -> Path:
    """`data_file` if given (relative to root), else the first existing candidate under root."""
    if data_file not in (None, ""):
        path = Path(str(data_file)).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise InputError(f"{benchmark}: data file {path.name} not found in {path.parent}")
        return path
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    raise InputError(
        f"{benchmark}: data file not found — looked for {', '.join(candidates)} in {root} "
        f"(point benchmark.root at the released dataset directory, or set data_file)"
    )


def read_table(path: Path) -> list[dict[str, Any]]:
    """Records of a .parquet / .tsv / .csv / .json / .jsonl file (cells of TSV/CSV as strings)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                frame = pd.read_parquet(path)
            except ImportError as err:
                raise InputError(f"reading {path} needs pyarrow (pip install pyarrow): {err}") from err
        elif suffix in (".tsv", ".csv"):
            frame = pd.read_csv(
                path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False, na_values=[""]
            )
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        elif suffix == ".json":
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            if isinstance(data, dict):  # {id: record} layouts
                data = [dict(v, _key=k) if isinstance(v, dict) else v for k, v in data.items()]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise InputError(f"{path} is not a JSON list of records")
            return data
        else:
            raise InputError(f"{path}: unsupported data file type {suffix!r} (parquet, tsv, csv, json, jsonl)")
    except InputError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    return frame.to_dict("records")


def find_video(directory: Path, name: str, extensions: Sequence[str]) -> tuple[Path | None, list[Path]]:
    """(existing path or None, paths tried). `name` may carry its own extension; otherwise each of
    `extensions` (".mp4", ...) is appended in order."""
    tried: list[Path] = []
    base = directory / name
    if Path(name).suffix and base.is_file():
        return base, [base]
    if Path(name).suffix:
        tried.append(base)
    stem = str(name)
    for ext in extensions:
        path = directory / f"{stem}{ext}"
        tried.append(path)
        if path.is_file():
            return path, tried
    return None, tried


def missing_video_reason(tried: Iterable[Path]) -> str:
    tried = list(tried)
    shown = ", ".join(str(p) for p in tried[:6]) + (" ..." if len(tried) > 6 else "")
    return f"video file not found (tried {shown})"


# --- the base class -----------------------------------------------------------------------------


class VideoBenchmark(Benchmark):
    """A video benchmark: subclasses set the class attributes and implement `records`,
    `make_sample`, `extract` and `score`."""

    modality = "video"
    env_var: str = ""  # fallback for the data root
    frame_sampling: str = "linspace"  # the pinned rule (data.video.SAMPLING_RULES)
    video_extensions: tuple[str, ...] = (".mp4",)

    def __init__(
        self,
        root: str | Path | None = None,
        limit: int | None = None,
        max_new_tokens: int | None = None,
        num_frames: int | None = None,
        frame_sampling: str | None = None,
        data_file: str | None = None,
        video_dir: str | None = None,
    ):
        super().__init__(resolve_data_root(root, self.name, "benchmark.root", env_var=self.env_var))
        self.limit = None if limit is None else int(limit)
        if max_new_tokens is not None:
            self.max_new_tokens = int(max_new_tokens)
        self.num_frames = None if num_frames is None else int(num_frames)
        if self.num_frames is not None and self.num_frames < 1:
            raise InputError(f"{self.name}: num_frames must be >= 1, got {self.num_frames}")
        if frame_sampling is not None:
            self.frame_sampling = str(frame_sampling)
        if self.frame_sampling not in SAMPLING_RULES:
            raise InputError(
                f"{self.name}: unknown frame_sampling {self.frame_sampling!r} (known: {', '.join(SAMPLING_RULES)})"
            )
        self.data_file = data_file
        self.video_dir_override = None if video_dir in (None, "") else Path(str(video_dir)).expanduser()

    # --- what subclasses provide ----------------------------------------------------------------
    @abc.abstractmethod
    def records(self) -> Iterator[dict[str, Any]]:
        """The released records, in file order (raises InputError when the data file is missing)."""

    @abc.abstractmethod
    def make_sample(self, rec: dict[str, Any]) -> Sample:
        """Apply the pinned prompt; raise RowError for an unusable record (missing video included)."""

    @abc.abstractmethod
    def record_id(self, rec: dict[str, Any], position: int) -> str:
        """A stable id for the record (used for errors too)."""

    # --- shared behaviour -----------------------------------------------------------------------
    def read_records(
        self, candidates: Sequence[str], required: Iterable[str] | Callable[[set[str]], Iterable[str]]
    ) -> list[dict[str, Any]]:
        """The rows of the released data file (`data_file`, else the first of `candidates` under the
        root), which must have the `required` columns (or a function of the file's columns giving
        them, for a benchmark released in several layouts)."""
        path = find_data_file(self.root, candidates, self.name, self.data_file)
        rows = read_table(path)
        if rows:
            columns = set(rows[0])
            require_columns(path, columns, required(columns) if callable(required) else required)
        return rows

    def describe(self) -> dict[str, Any]:
        """What results.json records about the benchmark."""
        return {
            "benchmark": self.name,
            "prompt_id": self.prompt_id,
            "extraction_id": self.extraction_id,
            "max_new_tokens": self.max_new_tokens,
            "num_frames": self.num_frames,
            "frame_sampling": self.frame_sampling,
        }

    def load(self, limit: int | None = None) -> Iterator[Sample | SampleError]:
        n = self.limit if limit is None else int(limit)
        for position, rec in enumerate(self.records()):
            if n is not None and position >= n:
                return
            try:
                sample_id = self.record_id(rec, position)
            except RowError as err:
                yield SampleError(id=f"#{position}", reason=str(err))
                continue
            try:
                self._require_question(rec)
                yield self.make_sample(rec)
            except RowError as err:
                yield SampleError(id=sample_id, reason=str(err))

    def _require_question(self, rec: dict[str, Any]) -> None:
        """A blank question is a skip before `make_sample` looks for (or decodes) the video; NaN /
        pd.NA (parquet, CSV gaps) count as missing.  (The template's fixed text would hide it from
        the models' check of the final prompt.)"""
        value = rec.get("question")
        if not isinstance(value, str):
            value = None if is_missing(value) else str(value)
        require_question(value)

    def video_path(self, directories: Path | Sequence[Path], name: str) -> Path:
        """The video file for `name` in the first of `directories` that has it (only the `video_dir`
        override when one is configured), trying `video_extensions`; RowError listing every path tried."""
        if self.video_dir_override is not None:
            directories = [self.video_dir_override]
        elif isinstance(directories, Path):
            directories = [directories]
        tried: list[Path] = []
        for directory in directories:
            path, attempts = find_video(directory, name, self.video_extensions)
            tried.extend(attempts)
            if path is not None:
                return path
        raise RowError(missing_video_reason(tried))

    def video_meta(self) -> dict[str, Any]:
        """Frame-sampling fields every video sample carries."""
        return {"frame_sampling": self.frame_sampling, "num_frames": self.num_frames}


def grouped_mean(pairs: Iterable[tuple[str | None, float]], scale: float = 1.0) -> dict[str, float]:
    """{group: mean value × scale} over (group, value) pairs, groups sorted; None groups skipped."""
    acc: dict[str, list[float]] = {}
    for group, value in pairs:
        if group is None:
            continue
        acc.setdefault(str(group), []).append(float(value))
    return {g: scale * sum(v) / len(v) for g, v in sorted(acc.items())}
