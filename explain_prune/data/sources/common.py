"""What the training-data sources share: annotation files, LLaVA conversations, ids, selection.

A source is built in two steps.  Construction reads the annotation (text only, no pixels), gives
every row an `Entry` with a stable id and the *part* / *group* it belongs to, applies the filters
and the selection, and fixes the order; so `len(source)` is known and the same on every run.
Iteration turns each entry into a `Sample` (opening its image / checking its video file) or, when
the row cannot be used, a `SampleError(id, reason)` in its place — bad rows are counted by the
caller, never silently dropped.  Iterating twice yields the same items in the same order.

Rules fixed here (and documented in docs/data.md):

* Conversations are LLaVA style: a list of turns `{"from": "human"|"gpt", "value": ...}` (the keys
  `role`/`content` and the roles `user`/`assistant` of some parquet exports are accepted too).
  Leading non-human turns (a system prompt, a stray gpt turn) are skipped; the sample is the FIRST
  human turn (its `<image>` / `<video>` markers removed) and the first gpt turn after it (the
  reference answer).  Later turns are not used (their count is kept in `meta["num_turns"]`):
  a follow-up question depends on the earlier answers, so it is not a standalone sample.
* Multiple choice: a question whose lines list options "A. ...", "B. ..." (or "(A) ...", "A) ...",
  consecutive letters from A, at least two) is multiple choice when the reference starts with one
  of those letters ("E. training.", "(B)", "C"); the options and the reference letter go to
  `meta["options"]` / `meta["answer_letter"]` and `meta["answer_type"] = "multiple_choice"`.
  Otherwise `meta["answer_type"] = "open_ended"`.
* Ids: `<prefix>/<record id>`; a record id seen before in the same file gets `#2`, `#3`, ... in file
  order; a record without an id uses `row<index>`.  Ids therefore do not depend on the filters,
  the selection or `limit`.
* Selection (`select_entries`): `balanced_per_part=n` keeps min(n, size) rows of every part;
  `group_totals={group: total}` splits each group's total equally over its parts (a part smaller
  than its share gives all its rows and the rest is re-split over the others) and drops the groups
  not listed.  The rows of a part are drawn with `random.Random(f"{seed}/{part}")`, so a part's
  draw depends only on (seed, part, the part's rows) and kept rows stay in file order.
"""

from __future__ import annotations

import abc
import io
import json
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from explain_prune.core import InputError, RowError, Sample, SampleError, resolve_data_root
from explain_prune.core.registry import Registry

log = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".json", ".jsonl", ".parquet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
HUMAN_ROLES = ("human", "user")
ANSWER_ROLES = ("gpt", "assistant")
MARKER_RE = re.compile(r"<(?:image|video)>")
OPTION_LINE_RE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.)])\s+(\S.*?)\s*$")
REFERENCE_LETTER_RE = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?=[.:,)]|\s*$))")


# --- entries and the source base class ------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One annotation row, before any pixels are read (`extra` may be shared between entries)."""

    id: str
    part: str  # selection unit of `balanced_per_part`
    group: str  # budget unit of `group_totals`
    where: str  # "file" or "file:row", for messages and meta
    record: dict[str, Any] | None = None  # the row, when read at construction
    path: Path | None = None  # a one-record JSON file read at iteration (Infinity-MM layout)
    error: str | None = None  # known at construction (bad JSON line, row is not an object)
    extra: dict[str, Any] = field(default_factory=dict)


SOURCES: Registry = Registry("data source")  # every source registers itself: @SOURCES.register(name)


class Source(abc.ABC):
    """An ordered, sized iterable of `Sample | SampleError` over a fixed list of entries."""

    name: str = ""

    def __init__(self, root: Path, entries: list[Entry], options: dict[str, Any]):
        self.root = root
        self.entries = entries
        self.options = options

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Sample | SampleError]:
        for entry in self.entries:
            if entry.error is not None:
                yield SampleError(entry.id, entry.error)
                continue
            try:
                yield self.make_sample(entry)
            except RowError as err:
                yield SampleError(entry.id, str(err))

    def stream(self) -> Iterator[Sample | SampleError]:
        """What generate reads (data.prefetch): the source itself."""
        return iter(self)

    @abc.abstractmethod
    def make_sample(self, entry: Entry) -> Sample:
        """The sample of one entry; raises RowError when the row cannot be used."""

    def part_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.part for e in self.entries).items()))

    def describe(self) -> dict[str, Any]:
        """What was selected, for logs and results."""
        return {"source": self.name, "root": str(self.root), "n": len(self), "parts": self.part_counts(),
                **self.options}


# --- options ------------------------------------------------------------------------------------


def dataset_root(root: str | Path | None, source: str) -> Path:
    """The source's dataset directory (`data.root`, which must exist: the annotation is read at once)."""
    path = resolve_data_root(root, f"data source {source!r}", "data.root")
    if not path.is_dir():
        raise InputError(
            f"data source {source!r}: root {path} is not a directory (set data.root, or EXPLAIN_PRUNE_DATA "
            f"for the default configs; see docs/data.md)"
        )
    return path


def annotation_paths(root: Path, annotation: str | Path | Sequence[str | Path] | None, source: str) -> list[Path] | None:
    """The explicit annotation file(s), relative to root unless absolute; None when not given."""
    if annotation in (None, ""):
        return None
    items = [annotation] if isinstance(annotation, (str, Path)) else list(annotation)
    paths = []
    for item in items:
        path = Path(str(item)).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise InputError(f"data source {source!r}: annotation file {path} not found")
        if path.suffix.lower() not in ANNOTATION_SUFFIXES:
            raise InputError(f"data source {source!r}: annotation {path.name} is not one of {ANNOTATION_SUFFIXES}")
        paths.append(path)
    if not paths:
        raise InputError(f"data source {source!r}: data.annotation is an empty list")
    return paths


def positive_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive integer or null, got {value!r}") from None
    if number < 1 or number != value:
        raise InputError(f"{what} must be a positive integer or null, got {value!r}")
    return number


def name_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) and v for v in items):
        raise InputError(f"{what} must be a non-empty list of names or null, got {value!r}")
    return items


def totals_mapping(value: Any, what: str) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise InputError(f"{what} must be a mapping {{group: number of samples}} or null, got {value!r}")
    return {str(k): positive_int(v, f"{what}.{k}") for k, v in value.items()}  # type: ignore[misc]


def apply_limit(entries: list[Entry], limit: Any) -> list[Entry]:
    n = positive_int(limit, "data.limit")
    return entries if n is None else entries[:n]


def select(
    entries: list[Entry], balanced_per_part: Any, group_totals: Any, limit: Any, seed: Any
) -> tuple[list[Entry], dict[str, Any]]:
    """The selection every annotated source shares: `balanced_per_part` or `group_totals` (drawn by
    `seed`, see `select_entries`), then the first `limit`.  Returns the kept entries and the
    validated options, which `Source.describe` reports."""
    options = {
        "balanced_per_part": positive_int(balanced_per_part, "data.balanced_per_part"),
        "group_totals": totals_mapping(group_totals, "data.group_totals"),
        "limit": positive_int(limit, "data.limit"),
        "seed": int(seed),
    }
    kept = select_entries(entries, options["seed"], options["balanced_per_part"], options["group_totals"])
    return apply_limit(kept, options["limit"]), options


# --- annotation files ---------------------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[dict[str, Any] | None, str | None]]:
    """(record, None) or (None, error) per row of a .json (a list of records, or one record),
    .jsonl (one record per line; a bad line is an error row) or .parquet file.

    A file that cannot be read at all is an InputError: it is a download problem, not a row."""
    suffix = path.suffix.lower()
    rows: list[tuple[dict[str, Any] | None, str | None]] = []
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    rows.append((None, f"{path.name} line {number}: invalid JSON ({err.msg})"))
                    continue
                rows.append(_row(value, f"{path.name} line {number}"))
        return rows
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"annotation {path}: not valid JSON ({err})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise InputError(f"annotation {path}: expected a JSON list of records, got {type(data).__name__}")
        return [_row(value, f"{path.name} row {i}") for i, value in enumerate(data)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise InputError(f"reading {path} needs pyarrow (pip install pyarrow): {err}") from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError on damaged files
            raise InputError(f"annotation {path}: unreadable parquet ({type(err).__name__}: {err})") from None
        return [_row(value, f"{path.name} row {i}") for i, value in enumerate(table.to_pylist())]
    raise InputError(f"annotation {path}: unsupported file type {suffix!r} (known: {ANNOTATION_SUFFIXES})")


def _row(value: Any, where: str) -> tuple[dict[str, Any] | None, str | None]:
    if isinstance(value, dict):
        return value, None
    return None, f"{where}: a record must be a JSON object, got {type(value).__name__}"


def record_ids(records: Sequence[dict[str, Any] | None], prefix: str) -> list[str]:
    """Stable, unique ids `<prefix>/<record id>` (duplicates get #2, #3 ...; no id: row<i>)."""
    used: set[str] = set()
    ids = []
    for row, record in enumerate(records):
        raw = record.get("id") if record is not None else None
        base = f"{prefix}/{raw}" if raw not in (None, "") else f"{prefix}/row{row}"
        candidate, k = base, 1
        while candidate in used:
            k += 1
            candidate = f"{base}#{k}"
        used.add(candidate)
        ids.append(candidate)
    return ids


# --- conversations ------------------------------------------------------------------------------


@dataclass
class Turn:
    question: str  # markers removed
    answer: str
    markers: int  # <image>/<video> markers in the first human turn
    num_turns: int  # human turns in the conversation


def strip_markers(text: str) -> str:
    """Remove <image>/<video> markers; tidy the whitespace they leave (not the option layout)."""
    text = MARKER_RE.sub(" ", text)
    lines = [re.sub(r"[ \t]{2,}", " ", line).strip() for line in text.split("\n")]
    return "\n".join(lines).strip()


def first_turn(conversations: Any) -> Turn:
    """The first human question and the first answer after it (see the module docstring)."""
    if hasattr(conversations, "tolist"):
        conversations = conversations.tolist()
    if not isinstance(conversations, list) or not conversations:
        raise RowError("record has no 'conversations' list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise RowError(f"conversation turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not isinstance(value, str):
            raise RowError(f"conversation turn {i} needs string 'from' and 'value'")
        turns.append((role.strip().lower(), value))
    start = next((i for i, (role, _) in enumerate(turns) if role in HUMAN_ROLES), None)
    if start is None:
        raise RowError("conversation has no human turn")
    raw_question = turns[start][1]
    question = strip_markers(raw_question)
    if not question:
        raise RowError("empty question (the first human turn has only the visual marker)")
    answer = next((value for role, value in turns[start + 1:] if role in ANSWER_ROLES), None)
    if answer is None or not answer.strip():
        raise RowError("no reference answer (no gpt turn after the first human turn)")
    return Turn(
        question=question,
        answer=answer.strip(),
        markers=len(MARKER_RE.findall(raw_question)),
        num_turns=sum(role in HUMAN_ROLES for role, _ in turns),
    )


def parse_options(question: str) -> dict[str, str]:
    """Option letter -> text from lines "A. ...", "(A) ...", "A) ..."; {} unless the letters run
    A, B, C, ... without a gap and there are at least two."""
    options: dict[str, str] = {}
    for line in question.split("\n"):
        match = OPTION_LINE_RE.match(line)
        if match:
            letter = match.group(1) or match.group(2)
            options.setdefault(letter, match.group(3))
    letters = sorted(options)
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    return options if len(letters) >= 2 and letters == expected else {}


def reference_letter(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter a reference answer starts with ("E. training.", "(B)", "C"), if any."""
    match = REFERENCE_LETTER_RE.match(answer)
    letter = next((g for g in match.groups() if g), None) if match else None
    return letter if letter in options else None


def answer_meta(question: str, answer: str, multiple_choice: bool | None = None) -> dict[str, Any]:
    """`answer_type` (+ `options`, `answer_letter` for multiple choice) for the correctness filter.

    `multiple_choice=True` (the row comes from a multiple-choice file) makes a question without
    options or a reference without a letter a RowError; None decides from the text."""
    options = parse_options(question)
    letter = reference_letter(answer, options) if options else None
    if letter is not None and multiple_choice is not False:
        return {"answer_type": "multiple_choice", "options": options, "answer_letter": letter}
    if multiple_choice:
        if not options:
            raise RowError("multiple-choice row without options 'A. ...', 'B. ...' in the question")
        raise RowError(f"multiple-choice reference {answer[:40]!r} does not start with an option letter")
    return {"answer_type": "open_ended"}


# --- visual files -------------------------------------------------------------------------------


def first_existing(candidates: Sequence[Path]) -> Path | None:
    for path in candidates:
        if path.is_file():
            return path
    return None


def open_image(value: Any, candidates: Sequence[Path]) -> Image.Image:
    """An RGB image from embedded bytes ({"bytes": ...}, as in HF parquet exports) or the first
    existing candidate path; RowError naming what was tried otherwise."""
    if isinstance(value, dict) and value.get("bytes"):
        try:
            with Image.open(io.BytesIO(value["bytes"])) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise RowError(f"unreadable embedded image: {type(err).__name__}: {err}") from None
    path = first_existing(candidates)
    if path is None:
        tried = ", ".join(str(p) for p in candidates) or "no path"
        raise RowError(f"image file not found (tried {tried})")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise RowError(f"unreadable image {path}: {type(err).__name__}: {err}") from None


# --- selection ----------------------------------------------------------------------------------


def waterfill(total: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """Split `total` as equally as possible over parts of the given sizes (a part never gets more
    than its size; what it cannot take goes to the others; leftovers of an uneven split go to the
    parts first in name order)."""
    quotas = {p: 0 for p in sizes}
    open_parts = sorted(p for p, n in sizes.items() if n > 0)
    remaining = total
    while remaining > 0 and open_parts:
        share, extra = divmod(remaining, len(open_parts))
        full = [p for p in open_parts if sizes[p] - quotas[p] <= share]
        if full:
            for p in full:
                remaining -= sizes[p] - quotas[p]
                quotas[p] = sizes[p]
                open_parts.remove(p)
            continue
        for i, p in enumerate(open_parts):
            add = share + (1 if i < extra else 0)
            quotas[p] += add
            remaining -= add
    return quotas


def select_entries(
    entries: list[Entry],
    seed: int,
    balanced_per_part: int | None = None,
    group_totals: Mapping[str, int] | None = None,
) -> list[Entry]:
    """The entries kept by `balanced_per_part` or `group_totals` (module docstring), in input order."""
    if balanced_per_part is not None and group_totals is not None:
        raise InputError("set at most one of data.balanced_per_part and data.group_totals")
    if balanced_per_part is None and group_totals is None:
        return entries
    by_part: dict[str, list[int]] = defaultdict(list)
    part_group: dict[str, str] = {}
    for i, entry in enumerate(entries):
        by_part[entry.part].append(i)
        part_group[entry.part] = entry.group
    if balanced_per_part is not None:
        quotas = {p: min(balanced_per_part, len(rows)) for p, rows in by_part.items()}
    else:
        assert group_totals is not None
        groups = sorted(set(part_group.values()))
        unknown = sorted(set(group_totals) - set(groups))
        if unknown:
            raise InputError(f"data.group_totals names group(s) {unknown} with no rows; groups present: {groups}")
        quotas = {p: 0 for p in by_part}
        for group, total in group_totals.items():
            sizes = {p: len(rows) for p, rows in by_part.items() if part_group[p] == group}
            available = sum(sizes.values())
            if total > available:
                log.warning("group %r: %d samples requested, only %d rows available (all kept)", group, total, available)
            quotas.update(waterfill(total, sizes))
    chosen: set[int] = set()
    for part, rows in by_part.items():
        k = quotas[part]
        if k >= len(rows):
            chosen.update(rows)
        elif k > 0:
            chosen.update(random.Random(f"{seed}/{part}").sample(rows, k))
    return [entry for i, entry in enumerate(entries) if i in chosen]
