"""Reader for VLMEvalKit image TSVs, and the base class of the benchmarks stored in them.

Format (VLMEvalKit `docs/en/Development.md`, `vlmeval/dataset/image_base.py`): one tab-separated file
`$LMUData/<Dataset>.tsv` with columns

* `index` — unique id of the row;
* `image` — base64 of the encoded image bytes (no `data:` prefix). A value of at most 64 characters
  is instead the `index` of another row whose image is reused (MME stores the second question of an
  image this way). A multi-image row holds a Python list literal of base64 strings, parsed here with
  `ast.literal_eval` (never `eval`);
* `image_path` (optional) — file name(s) of the image(s); for a "meta-only" TSV without an `image`
  column (e.g. VLMEvalKit's localised `<Dataset>_local.tsv`) the images are read from these paths,
  relative ones under `$LMUData/images/<Dataset>/`;
* `question`, `answer`, optional `hint`, option columns `A`, `B`, ... (an empty cell means the
  option does not exist), `category`, `l2-category`, `split`.

Cells are read as strings and only *empty* cells count as missing (pandas' default would also turn
literal texts such as "None" or "NA" into NaN and drop a real option called "None").

The file is decoded as UTF-8 row by row in effect: bytes that are not UTF-8 are kept (as lone
surrogates, `surrogateescape`) and make *their* row a counted SampleError naming it, while every
other row is read; only a header that is not UTF-8 (the file is not a TSV at all) refuses the file.
"""

from __future__ import annotations

import abc
import ast
import base64
import binascii
import io
import re
import string
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from PIL import Image

from explain_prune.benchmarks.base import Benchmark, require_columns
from explain_prune.core import InputError, RowError, Sample, SampleError, resolve_data_root
from explain_prune.core.sample import require_question
from explain_prune.benchmarks.base import percent  # noqa: F401  (re-exported to the benchmark modules)

IMAGE_REF_MAX_CHARS = 64  # an `image` value this short is the index of another row
OPTION_LETTERS = tuple(string.ascii_uppercase)


def resolve_root(root: str | Path | None = None) -> Path:
    """Data root: the configured `root`, else `$LMUData`, else `~/LMUData` (VLMEvalKit's default)."""
    return resolve_data_root(root, "VLMEvalKit benchmark", "benchmark.root", env_var="LMUData", default="~/LMUData")


def find_tsv(root: str | Path, dataset: str) -> Path:
    """`<root>/<dataset>.tsv`, or VLMEvalKit's localised `<root>/<dataset>_local.tsv`."""
    root = Path(root)
    for name in (f"{dataset}.tsv", f"{dataset}_local.tsv"):
        path = root / name
        if path.is_file():
            return path
    raise InputError(
        f"benchmark file {dataset}.tsv not found in {root} "
        f"(set the benchmark root, or the LMUData environment variable, to the directory holding it)"
    )


_NOT_UTF8 = re.compile("[\udc80-\udcff]+")  # what `surrogateescape` makes of bytes that are not UTF-8


def read_tsv(path: str | Path) -> pd.DataFrame:
    """The whole table as strings; empty cells are NaN.

    Decoded with `surrogateescape`, so one row's invalid bytes do not refuse the file (strict
    decoding fails the whole read, naming only a byte offset); `not_utf8` finds them per row.
    dtype=object: pandas' string dtype cannot hold those surrogates (and copying hundreds of MB of
    base64 into it is slower than keeping the parsed Python strings)."""
    not_tsv = f"cannot parse {path} as a VLMEvalKit TSV"
    try:
        frame = pd.read_csv(
            path, sep="\t", dtype=object, keep_default_na=False, na_values=[""],
            encoding="utf-8", encoding_errors="surrogateescape",
        )
    except UnicodeError as err:  # pandas' string column index refuses a header holding such bytes
        raise InputError(f"{not_tsv}: its header is not UTF-8 text") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{not_tsv}: {err}") from err
    if any(not_utf8(str(name)) for name in frame.columns):  # an object column index keeps them
        raise InputError(f"{not_tsv}: its header is not UTF-8 text")
    return frame


def not_utf8(text: str) -> str | None:
    """Where `text` (read with `surrogateescape`) held bytes that are not UTF-8, or None.
    `isascii` is O(1) in CPython, so the large base64 cells cost nothing here."""
    if text.isascii():
        return None
    match = _NOT_UTF8.search(text)
    if match is None:
        return None
    raw = match.group().encode("utf-8", "surrogateescape")[:8]
    return f"byte(s) {raw!r} at character {match.start()}"


def printable(text: str) -> str:
    """`text` with bytes that are not UTF-8 shown as \\xNN escapes (for ids and messages)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def cell(value: Any) -> str | None:
    """A cell as a string (unchanged), or None when the cell is empty."""
    if value is None:
        return None
    if isinstance(value, float) and pd.isna(value):
        return None
    return str(value)


def parse_list_field(value: str) -> list[str]:
    """`"['a', 'b']"` -> ['a', 'b'] (safe literal parsing); any other string -> [value]."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise RowError(f"list field is not a valid Python list literal: {err}") from err
        if not isinstance(parsed, list) or not parsed or not all(isinstance(x, str) for x in parsed):
            raise RowError("list field must be a non-empty list of strings")
        return parsed
    return [value]


def decode_base64_image(data: str) -> Image.Image:
    """base64 text (no `data:` prefix) -> a fully decoded RGB PIL image; RowError on any failure."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RowError(f"corrupt base64 image data: {err}") from err
    return _open_image(io.BytesIO(raw), "base64 image")


def _open_image(source: Any, what: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RowError(f"undecodable {what}: {type(err).__name__}: {err}") from err


def row_options(row: dict[str, Any]) -> dict[str, str]:
    """Option columns A, B, ... that are present and non-empty, in letter order."""
    return {k: str(row[k]) for k in OPTION_LETTERS if k in row and cell(row[k]) is not None}


_CJK = re.compile("[\u4e00-\u9fff]")


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None, qwen2vl: bool = True) -> str:
    """VLMEvalKit's MCQ prompt: optional "Hint: ..." line, "Question: ...", "Options:" with one
    "X. text" line each, then the instruction.

    qwen2vl: `Qwen2VLPromptMixin._build_mcq_prompt` (vlmeval/vlm/qwen2_vl/prompt.py): Chinese
    instruction when the prompt has CJK characters, trailing whitespace stripped.  Otherwise the
    dataset default (`ImageMCQDataset.build_prompt`, vlmeval/dataset/image_mcq.py L212-238), used by
    LLaVA-OneVision and VILA: the English instruction followed by " \\n", nothing stripped."""
    prompt = f"Hint: {hint}\n" if hint is not None else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        if not qwen2vl:
            return prompt + "Please select the correct answer from the options above. \n"
        prompt += "请直接回答选项字母。" if _CJK.search(prompt) else "Please select the correct answer from the options above."
    return prompt.rstrip() if qwen2vl else prompt


@dataclass
class TSVRow:
    """One readable row: its cells (strings, None when empty), decoded images, and the key of the
    image it shows (its `image_path`, or the index of the row that stores the image bytes)."""

    index: str
    cells: dict[str, str | None]
    images: list[Image.Image] = field(default_factory=list)
    image_key: str = ""

    def get(self, name: str) -> str | None:
        return self.cells.get(name)


class VLMEvalTable:
    """Iterates a VLMEvalKit TSV as `TSVRow`s (or `SampleError`s for unusable rows)."""

    def __init__(self, path: str | Path, image_dir: str | Path, cache_size: int = 16):
        self.path = Path(path)
        self.image_dir = Path(image_dir)
        frame = read_tsv(self.path)
        require_columns(self.path, frame.columns, ("index", "question"))
        if "image" not in frame.columns and "image_path" not in frame.columns:
            raise InputError(f"{self.path} has neither an 'image' nor an 'image_path' column")
        self.columns = list(frame.columns)
        self.records = [{k: cell(v) for k, v in rec.items()} for rec in frame.to_dict("records")]
        # row position -> why it is unreadable: a row with bytes that are not UTF-8 is skipped whole
        # (its text, or its image, is not what the file meant)
        self.undecodable = {pos: reason for pos, rec in enumerate(self.records) if (reason := self._not_utf8(rec, pos))}
        index = [r["index"] for r in self.records]
        if any(i is None for i in index):
            raise InputError(f"{self.path} has rows with an empty 'index'")
        dupes = sorted(i for i, c in Counter(index).items() if c > 1)
        if dupes:
            raise InputError(f"{self.path} has duplicate index values: {dupes[:10]}")
        self.image_by_index = {r["index"]: r.get("image") for r in self.records}
        self._cache: OrderedDict[str, list[Image.Image]] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self.records)

    def _not_utf8(self, rec: dict[str, str | None], position: int) -> str | None:
        for name, value in rec.items():
            where = None if value is None else not_utf8(value)
            if where is not None:
                return f"invalid UTF-8 in column {name!r}: {where} (data row {position + 1} of {self.path.name})"
        return None

    def rows(self) -> Iterator[TSVRow | SampleError]:
        for position, rec in enumerate(self.records):
            idx = rec["index"]
            if position in self.undecodable:
                yield SampleError(id=printable(idx), reason=self.undecodable[position])
                continue
            try:
                images, key = self._images(rec)
            except RowError as err:
                yield SampleError(id=str(idx), reason=str(err))
                continue
            yield TSVRow(index=str(idx), cells=rec, images=images, image_key=key)

    # --- images -----------------------------------------------------------------------------
    def _images(self, rec: dict[str, str | None]) -> tuple[list[Image.Image], str]:
        paths = parse_list_field(rec["image_path"]) if rec.get("image_path") else []
        if "image" not in self.columns:
            if not paths:
                raise RowError("row has neither image data nor an image_path")
            return [self._read_file(p) for p in paths], "|".join(paths)
        data = rec.get("image")
        if data is None:
            if paths:  # no bytes in the TSV for this row: fall back to the image files
                return [self._read_file(p) for p in paths], "|".join(paths)
            raise RowError("row has an empty image field and no image_path")
        source = rec["index"]
        if len(data) <= IMAGE_REF_MAX_CHARS:  # the index of the row holding the image
            ref = data.strip()
            target = self.image_by_index.get(ref, ...)
            if target is ...:
                raise RowError(f"image field refers to row index {ref!r}, which is not in the TSV")
            if target is None or len(target) <= IMAGE_REF_MAX_CHARS:
                raise RowError(f"image field refers to row index {ref!r}, which holds no image data")
            source, data = ref, target
        key = "|".join(paths) if paths else f"index:{source}"
        if source in self._cache:
            self._cache.move_to_end(source)
            return self._cache[source], key
        images = [decode_base64_image(b64) for b64 in parse_list_field(data)]
        self._cache[source] = images
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return images, key

    def _read_file(self, name: str) -> Image.Image:
        path = Path(name)
        if not path.is_absolute():
            path = self.image_dir / path
        if not path.is_file():
            raise RowError(f"image file {path} does not exist")
        return _open_image(path, f"image file {path}")


class VLMEvalImageBenchmark(Benchmark):
    """A benchmark stored as a VLMEvalKit TSV. Subclasses set `name`, `tsv_name`, the pinned ids and
    implement `make_sample`, `extract` and `score`."""

    modality = "image"
    tsv_name: str = ""  # file stem under the data root, e.g. "MME" for $LMUData/MME.tsv

    def __init__(
        self,
        root: str | Path | None = None,
        tsv: str | None = None,
        limit: int | None = None,
        max_new_tokens: int | None = None,
    ):
        super().__init__(resolve_root(root))
        self.tsv_name = tsv or type(self).tsv_name
        self.limit = None if limit is None else int(limit)
        if max_new_tokens is not None:
            self.max_new_tokens = int(max_new_tokens)

    @property
    def tsv_path(self) -> Path:
        return find_tsv(self.root, self.tsv_name)

    def describe(self) -> dict[str, Any]:
        """What results.json records about the benchmark."""
        return {
            "benchmark": self.name,
            "tsv": self.tsv_name,
            "prompt_id": self.prompt_id,
            "extraction_id": self.extraction_id,
            "max_new_tokens": self.max_new_tokens,
        }

    def load(self, limit: int | None = None) -> Iterator[Sample | SampleError]:
        table = VLMEvalTable(self.tsv_path, image_dir=self.root / "images" / self.tsv_name)
        require_columns(table.path, table.columns, ("answer",), why=": a test split without ground truth?")
        n = self.limit if limit is None else int(limit)
        for i, row in enumerate(table.rows()):
            if n is not None and i >= n:
                return
            if isinstance(row, SampleError):
                yield row
                continue
            if row.get("answer") is None or not row.get("answer").strip():
                yield SampleError(id=row.index, reason="row has no answer")
                continue
            try:
                require_question(row.get("question"))  # before the template can hide a blank one
                yield self.make_sample(row)
            except RowError as err:
                yield SampleError(id=row.index, reason=str(err))

    def base_meta(self, row: TSVRow) -> dict[str, Any]:
        """Scorer-relevant fields every image benchmark keeps (JSON-serialisable)."""
        return {
            "index": row.index,
            "question": row.get("question"),
            "category": row.get("category"),
            "l2-category": row.get("l2-category"),
            "split": row.get("split"),
            "image_key": row.image_key,
        }

    @abc.abstractmethod
    def make_sample(self, row: TSVRow) -> Sample:
        """Apply the pinned prompt; raise RowError if the row is unusable for this benchmark."""


def grouped_accuracy(pairs: list[tuple[str | None, bool]]) -> dict[str, float]:
    """{group: accuracy %} over (group, correct) pairs, groups sorted; missing groups skipped."""
    totals: dict[str, list[int]] = {}
    for group, ok in pairs:
        if group is None:
            continue
        t = totals.setdefault(group, [0, 0])
        t[0] += int(ok)
        t[1] += 1
    return {g: percent(h, n) for g, (h, n) in sorted(totals.items())}


class VLMEvalMatchedBenchmark(VLMEvalImageBenchmark):
    """A VLMEvalKit TSV benchmark whose exact extraction may fall back to VLMEvalKit's LLM matcher
    (`llm_matcher: true`, through the run's judge; benchmarks.matcher).  Off by default: VLMEvalKit's
    `exact_matching` policy."""

    def __init__(self, root: str | Path | None = None, llm_matcher: bool = False, **kwargs: Any):
        super().__init__(root, **kwargs)
        self.llm_matcher = bool(llm_matcher)
        if self.llm_matcher:
            self.extraction_id = f"{type(self).extraction_id}+llm_matcher"

    @property
    def needs_judge(self) -> bool:
        return self.llm_matcher

    def matcher_judge(self, judge: Any) -> Any:
        if judge is None:
            raise InputError(f"{self.name}: llm_matcher=true needs a judge (judge=openai_compatible, or judge=fake)")
        return judge

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "llm_matcher": self.llm_matcher}
