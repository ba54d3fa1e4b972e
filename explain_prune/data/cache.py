"""The relevance cache (docs/design.md §Relevance cache): per (model, data, modality) a directory of

    meta.json                              model name/id, data name/source, modality, config hash, versions
    part000of001-00000.safetensors         a shard: flat float32 `a0`, `rv` (samples concatenated),
                                           int64 `offsets` [n+1], and per-token features `feature.<name>`
                                           [total tokens, C] (format 2: a0_heads, kv_norm, see
                                           explain.attention.FIRST_LAYER_FEATURES); the sample ids in the
                                           safetensors metadata
    index-part000of001.jsonl               one line per sample: id, shard, offset, length, grid (t,h,w),
                                           correct, answer, + the shard's byte size and sha256

Writing (`CacheWriter`): samples are buffered; every `shard_size` samples a shard is written to a
temporary name, fsynced and `os.replace`d into place, and only then are its index lines appended
(and fsynced).  A job killed at any point therefore leaves either a complete, indexed shard, or
files the index does not reference (a temp file, an orphan shard, a half line at the end of the
index) which the next writer of the same part removes before it resumes; `done_ids()` lists what
is indexed so a rerun skips it.  Shard and index names carry `shard_id`/`num_shards` so SLURM array
parts write into one directory without collisions.  A writer holds an advisory lock on its part
(`.lock-<part>`, core.lock) from open to close, so a second writer of the same part stops at once
with one line; the kernel releases the lock of a killed writer.  meta.json is written with the first
shard: a run that dies before caching anything leaves no meta.json for later runs to trip over, and
a cache that holds no sample yet is re-initialised with the new settings instead of refused.

Reading (`CacheReader`): one or more directories (or parts) are merged after checking each
meta.json against what the caller expects (model / data / modality); every referenced shard is
verified (size + sha256, safetensors header, tensor shapes, offsets) and every vector checked for
NaN/inf.  All problems are `InputError`s naming the directory, file or sample.  Vectors are kept in
memory (8 bytes per visual token: ~130 MB for 10K samples of 1600 tokens); the per-token features
are read only when asked for (`features=`), as a compressor variant needs them.

Format history: 1 = a0 / rv only; 2 adds the `feature.<name>` tensors.  A cache of another format
is refused with one line (regenerate it), never read with a guessed layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from explain_prune.core import (
    InputError,
    default_file_mode,
    fsync_dir,
    save_safetensors_atomic,
    write_json_atomic,
)
from explain_prune.core.lock import DirLock

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
FEATURE_PREFIX = "feature."  # shard tensor `feature.<name>`: [total tokens, channels] float32
META_FILE = "meta.json"
IDENTITY_FIELDS = ("model", "data", "modality")
SHARD_RE = re.compile(r"^(part\d{3,}of\d{3,})-(\d{5,})\.safetensors$")
INDEX_RE = re.compile(r"^index-(part\d{3,}of\d{3,})\.jsonl$")
VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "lightning", "explain_prune")


# ----------------------------------------------------------------------------- helpers


def config_hash(config: Any) -> str:
    """sha256 (first 16 hex) of a JSON-able config, keys sorted: what produced the cache."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def make_meta(
    model: str,
    data: str,
    modality: str,
    model_id: str | None = None,
    data_source: str | None = None,
    config: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The meta.json of a cache.  `config` is whatever determines the cached values (relevance
    settings, frame budget ...) — its hash is compared when a writer resumes into the directory."""
    meta = {
        "format": CACHE_FORMAT,
        "model": str(model),
        "model_id": model_id,
        "data": str(data),
        "data_source": data_source,
        "modality": str(modality),
        "config_hash": config_hash(config) if config is not None else None,
        "config": config,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta.update(extra)
    return meta


def part_name(shard_id: int, num_shards: int) -> str:
    return f"part{int(shard_id):03d}of{int(num_shards):03d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META_FILE
    if not directory.is_dir():
        raise InputError(f"cache directory not found: {directory}")
    if not path.is_file():
        raise InputError(f"not a relevance cache (no {META_FILE}): {directory}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"unreadable {path}: {err}") from None
    if not isinstance(meta, dict):
        raise InputError(f"unreadable {path}: not a JSON object")
    return meta


def check_meta(meta: Mapping[str, Any], expect: Mapping[str, Any] | None, where: str | Path) -> None:
    """Refuse a cache whose identity differs from what is asked (None = any)."""
    if int(meta.get("format", -1)) != CACHE_FORMAT:
        raise InputError(
            f"cache {where}: format {meta.get('format')!r}, this code reads format {CACHE_FORMAT} "
            "(regenerate it with python -m explain_prune.generate, or delete it so train rebuilds it)"
        )
    for key, wanted in (expect or {}).items():
        if wanted is None:
            continue
        have = meta.get(key)
        if str(have) != str(wanted):
            hint = (
                " (built with other relevance / frame settings: set cache_dir to write a new cache)"
                if key == "config_hash"
                else ""
            )
            raise InputError(f"cache {where}: meta.json {key}={have!r} but {key}={wanted!r} was asked{hint}")


def _read_index(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parse an index file.  A last line without its newline is an interrupted append: it is
    ignored (and its byte offset returned so a writer can cut it); any other bad line is an error."""
    raw = path.read_bytes()
    complete_end = raw.rfind(b"\n") + 1
    if complete_end < len(raw):
        log.warning("%s: ignoring an incomplete last line (interrupted write)", path)
    entries = []
    for lineno, line in enumerate(raw[:complete_end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            for key in ("id", "shard", "offset", "length"):
                entry[key]  # noqa: B018 - presence check
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"corrupt index {path} line {lineno}: {err}") from None
        entries.append(entry)
    return entries, complete_end


def _index_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if INDEX_RE.match(p.name))


def _check_vector(name: str, values: torch.Tensor, sample_id: str, shard: Path) -> None:
    """values [N] or [N, C]: one line naming the first token holding a NaN / inf."""
    bad_tokens = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(-1)
    if bool(bad_tokens.any()):
        token = int(bad_tokens.nonzero()[0, 0])
        row = values[token].reshape(-1)
        raise InputError(
            f"non-finite value ({float(row[~torch.isfinite(row)][0])}) in {name} of sample {sample_id!r} "
            f"at token {token} (shard {shard})"
        )


# ----------------------------------------------------------------------------- writer


class CacheWriter:
    """Append samples to a cache directory; atomic shards; resumable.

    >>> with CacheWriter(dir, make_meta("qwen2vl", "infinity_mm", "image"), shard_id=3, num_shards=8) as w:
    ...     for s in samples:
    ...         if s.id not in w.done_ids(): w.add(s.id, a0, rv, grid, correct, answer)
    """

    def __init__(
        self,
        directory: str | Path,
        meta: Mapping[str, Any],
        shard_id: int = 0,
        num_shards: int = 1,
        shard_size: int = 256,
        verify_existing: bool = True,
    ):
        if not 0 <= int(shard_id) < int(num_shards):
            raise InputError(f"shard_id must be in [0, num_shards), got {shard_id}/{num_shards}")
        if int(shard_size) < 1:
            raise InputError(f"shard_size must be >= 1, got {shard_size}")
        for key in IDENTITY_FIELDS:
            if not meta.get(key):
                raise InputError(f"cache meta lacks {key!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.part = part_name(shard_id, num_shards)
        self.shard_size = int(shard_size)
        self.meta = dict(meta)
        self.meta.setdefault("format", CACHE_FORMAT)
        self.index_path = self.directory / f"index-{self.part}.jsonl"
        self._buffer: list[dict[str, Any]] = []
        self._meta_published = False
        self._lock = DirLock(self.directory / f".lock-{self.part}", f"cache {self.directory} (part {self.part})").acquire()
        try:
            self._check_meta()
            self._recover(verify_existing)
            self._done = self._load_done_ids()
        except BaseException:
            self._lock.release()
            raise
        self._next_seq = self._max_seq() + 1

    # --- set-up -------------------------------------------------------------------------
    def _holds_samples(self) -> bool:
        return any(p.stat().st_size > 0 for p in _index_files(self.directory))

    def _check_meta(self) -> None:
        """An existing meta.json must match, unless the cache holds no sample yet (then the first
        shard rewrites it)."""
        if not (self.directory / META_FILE).is_file():
            return
        try:
            check_meta(read_meta(self.directory), self._identity(), self.directory)
        except InputError:
            if self._holds_samples():
                raise
            log.warning("cache %s holds no sample yet: its meta.json is replaced by this run's", self.directory)

    def _identity(self) -> dict[str, Any]:
        return {k: self.meta.get(k) for k in (*IDENTITY_FIELDS, "config_hash")}

    def _publish_meta(self) -> None:
        """Before this writer's first shard: write meta.json, or check the one another part wrote
        meanwhile."""
        if self._meta_published:
            return
        path = self.directory / META_FILE
        if path.is_file() and self._holds_samples():
            check_meta(read_meta(self.directory), self._identity(), self.directory)
        else:
            write_json_atomic(path, self.meta)
        self._meta_published = True

    def _own_shards(self) -> dict[str, Path]:
        return {
            p.name: p
            for p in self.directory.iterdir()
            if (m := SHARD_RE.match(p.name)) is not None and m.group(1) == self.part
        }

    def _recover(self, verify: bool) -> None:
        """Undo what a killed writer of this part left: temp files, a half index line,
        corrupt or unindexed shards (their samples are then rewritten)."""
        for p in self.directory.iterdir():
            if p.name.startswith(f".{self.part}-") and ".tmp" in p.name:
                log.warning("removing leftover temp file %s", p)
                p.unlink()
        entries: list[dict[str, Any]] = []
        if self.index_path.is_file():
            entries, complete_end = _read_index(self.index_path)
            if complete_end < self.index_path.stat().st_size:
                with open(self.index_path, "r+b") as fh:
                    fh.truncate(complete_end)
                    fh.flush()
                    os.fsync(fh.fileno())
        shards = self._own_shards()
        bad: set[str] = set()
        if verify:
            by_shard: dict[str, list[dict[str, Any]]] = {}
            for e in entries:
                by_shard.setdefault(e["shard"], []).append(e)
            for name, group in by_shard.items():
                try:
                    _load_shard(self.directory / name, group)
                except InputError as err:
                    log.warning("dropping shard %s from the index: %s", name, err)
                    bad.add(name)
        if bad:
            kept = [e for e in entries if e["shard"] not in bad]
            tmp = self.index_path.with_name(f".{self.part}-index.tmp-{os.getpid()}")
            with open(tmp, "w") as fh:
                fh.writelines(json.dumps(e, sort_keys=True) + "\n" for e in kept)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.index_path)
            entries = kept
        referenced = {e["shard"] for e in entries}
        for name, path in shards.items():
            if name not in referenced:
                log.warning("removing unindexed shard %s (interrupted write)", path)
                path.unlink()
        fsync_dir(self.directory)

    def _load_done_ids(self) -> set[str]:
        done: set[str] = set()
        for path in _index_files(self.directory):
            entries, _ = _read_index(path)
            done.update(str(e["id"]) for e in entries)
        return done

    def _max_seq(self) -> int:
        seqs = [int(SHARD_RE.match(n).group(2)) for n in self._own_shards()]  # type: ignore[union-attr]
        return max(seqs, default=-1)

    # --- API ------------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """Ids already indexed (by any part) or buffered in this writer."""
        return set(self._done) | {b["id"] for b in self._buffer}

    def add(
        self,
        sample_id: str,
        a0: torch.Tensor | Sequence[float],
        rv: torch.Tensor | Sequence[float],
        grid: Sequence[int] | None = None,
        correct: bool | None = None,
        answer: str | None = None,
        features: Mapping[str, torch.Tensor] | None = None,
    ) -> bool:
        """Buffer one sample; returns False (and writes nothing) if its id is already done.
        `features`: name -> [N] or [N, C] per-token values (every sample of a cache has the same names)."""
        sample_id = str(sample_id)
        if sample_id in self._done or any(b["id"] == sample_id for b in self._buffer):
            return False
        a0 = torch.as_tensor(a0, dtype=torch.float32).detach().cpu().reshape(-1)
        rv = torch.as_tensor(rv, dtype=torch.float32).detach().cpu().reshape(-1)
        if a0.numel() == 0 or a0.numel() != rv.numel():
            raise InputError(f"sample {sample_id!r}: a0 has {a0.numel()} values, rv {rv.numel()} (need equal, > 0)")
        per_token = {}
        for name, value in sorted((features or {}).items()):
            value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            value = value[:, None] if value.dim() == 1 else value
            if value.dim() != 2 or value.shape[0] != a0.numel():
                raise InputError(f"sample {sample_id!r}: feature {name!r} has shape {tuple(value.shape)}, need [{a0.numel()}, C]")
            per_token[name] = value.contiguous()
        if self._buffer and sorted(per_token) != sorted(self._buffer[0]["features"]):
            raise InputError(
                f"sample {sample_id!r}: features {sorted(per_token)} differ from the other samples' "
                f"{sorted(self._buffer[0]['features'])}"
            )
        for name, vec in (("a0", a0), ("rv", rv), *per_token.items()):
            if not bool(torch.isfinite(vec).all()):
                raise InputError(f"sample {sample_id!r}: non-finite value in {name}; not cached")
        grid_list = None if grid is None else [int(g) for g in grid]
        if grid_list is not None and len(grid_list) != 3:
            raise InputError(f"sample {sample_id!r}: grid must be (t, h, w), got {grid}")
        self._buffer.append(
            {
                "id": sample_id,
                "a0": a0,
                "rv": rv,
                "grid": grid_list,
                "correct": None if correct is None else bool(correct),
                "answer": answer,
                "features": per_token,
            }
        )
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return True

    def flush(self) -> Path | None:
        """Write the buffered samples as one shard (atomic), then append their index lines."""
        if not self._buffer:
            return None
        self._publish_meta()
        name = f"{self.part}-{self._next_seq:05d}.safetensors"
        final = self.directory / name
        lengths = [b["a0"].numel() for b in self._buffer]
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        tensors = {
            "a0": torch.cat([b["a0"] for b in self._buffer]).contiguous(),
            "rv": torch.cat([b["rv"] for b in self._buffer]).contiguous(),
            "offsets": offsets,
        }
        for feature in self._buffer[0]["features"]:
            try:
                tensors[FEATURE_PREFIX + feature] = torch.cat([b["features"][feature] for b in self._buffer]).contiguous()
            except RuntimeError:
                raise InputError(f"feature {feature!r}: its channel count differs between samples") from None
        metadata = {
            "format": str(CACHE_FORMAT),
            "sample_ids": json.dumps([b["id"] for b in self._buffer]),
            "model": str(self.meta["model"]),
            "data": str(self.meta["data"]),
            "modality": str(self.meta["modality"]),
        }
        save_safetensors_atomic(tensors, final, metadata=metadata)
        size, digest = final.stat().st_size, _sha256(final)
        lines = []
        for row, b in enumerate(self._buffer):
            entry = {
                "id": b["id"],
                "shard": name,
                "row": row,
                "offset": int(offsets[row]),
                "length": lengths[row],
                "grid": b["grid"],
                "correct": b["correct"],
                "answer": b["answer"],
                "shard_bytes": size,
                "shard_sha256": digest,
            }
            lines.append(json.dumps(entry, sort_keys=True) + "\n")
        fd = os.open(str(self.index_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, default_file_mode())
        try:
            os.write(fd, "".join(lines).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._done.update(b["id"] for b in self._buffer)
        self._buffer = []
        self._next_seq += 1
        return final

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # On an exception the buffered samples are still complete: keep them.
        self.close()


# ----------------------------------------------------------------------------- reader


@dataclass
class CachedSample:
    id: str
    data: str
    a0: torch.Tensor  # [N] float32
    rv: torch.Tensor  # [N] float32
    grid: tuple[int, int, int] | None
    correct: bool | None
    answer: str | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N, C] float32 (those asked for)

    @property
    def length(self) -> int:
        return int(self.a0.numel())


def _load_shard(path: Path, entries: Sequence[Mapping[str, Any]], features: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Load and verify one shard (a0 / rv / offsets, and the per-token `features` asked for) against
    its index entries; InputError names the file."""
    if not path.is_file():
        raise InputError(f"missing shard {path} (referenced by the index)")
    expected_size = entries[0].get("shard_bytes")
    if expected_size is not None and path.stat().st_size != int(expected_size):
        raise InputError(
            f"truncated or corrupt shard {path}: {path.stat().st_size} bytes, the index says {expected_size}"
        )
    expected_sha = entries[0].get("shard_sha256")
    if expected_sha is not None and _sha256(path) != expected_sha:
        raise InputError(f"corrupt shard {path}: sha256 differs from the index")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing = {"a0", "rv", "offsets"} - keys
            if missing:
                raise InputError(f"corrupt shard {path}: missing tensors {sorted(missing)}")
            held = sorted(k.removeprefix(FEATURE_PREFIX) for k in keys if k.startswith(FEATURE_PREFIX))
            absent = [name for name in features if name not in held]
            if absent:
                raise InputError(
                    f"shard {path} holds no per-token feature {absent[0]!r} (it holds: {', '.join(held) or 'none'}); "
                    "regenerate the cache with this version's python -m explain_prune.generate"
                )
            tensors = {k: handle.get_tensor(k) for k in ("a0", "rv", "offsets", *(FEATURE_PREFIX + n for n in features))}
    except (SafetensorError, OSError) as err:
        raise InputError(f"truncated or corrupt shard {path}: {err}") from None
    a0, rv, offsets = tensors["a0"], tensors["rv"], tensors["offsets"]
    if a0.dtype != torch.float32 or rv.dtype != torch.float32 or a0.dim() != 1 or a0.shape != rv.shape:
        raise InputError(f"corrupt shard {path}: a0/rv must be equal-length 1-D float32")
    for name in features:
        value = tensors[FEATURE_PREFIX + name]
        if value.dtype != torch.float32 or value.dim() != 2 or value.shape[0] != a0.numel():
            raise InputError(f"corrupt shard {path}: feature {name!r} must be float32 [{a0.numel()}, C], got {tuple(value.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 2 or int(offsets[-1]) != a0.numel() or int(offsets[0]) != 0:
        raise InputError(f"corrupt shard {path}: offsets do not cover a0/rv")
    for e in entries:
        off, length = int(e["offset"]), int(e["length"])
        if length <= 0 or off < 0 or off + length > a0.numel():
            raise InputError(f"index entry of sample {e['id']!r} points outside shard {path}")
        if "row" in e and (int(offsets[int(e["row"])]) != off or int(offsets[int(e["row"]) + 1]) != off + length):
            raise InputError(f"index entry of sample {e['id']!r} disagrees with the offsets of shard {path}")
    return tensors


def _new_entries_by_shard(
    directory: Path, data: str, seen: dict[str, Path]
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """The index entries of `directory` whose `<data>/<id>` is not in `seen` (which they join),
    grouped by shard name, and how many were skipped: a SLURM part rerun may index a sample twice."""
    entries: list[dict[str, Any]] = []
    for index_path in _index_files(directory):
        entries.extend(_read_index(index_path)[0])
    by_shard: dict[str, list[dict[str, Any]]] = {}
    duplicates = 0
    for e in entries:
        key = f"{data}/{e['id']}"
        if key in seen:
            duplicates += 1
            continue
        seen[key] = directory
        by_shard.setdefault(e["shard"], []).append(e)
    return by_shard, duplicates


def _shard_samples(
    shard_path: Path, entries: Sequence[Mapping[str, Any]], data: str, check_finite: bool, features: Sequence[str] = ()
) -> list[CachedSample]:
    """One verified shard cut into its samples' a0/rv vectors [length] and feature rows [length, C]
    (views of the shard's flat tensors); a NaN/inf value is an InputError naming the sample, as it
    would poison training."""
    tensors = _load_shard(shard_path, entries, features)
    samples = []
    for e in entries:
        off, length = int(e["offset"]), int(e["length"])
        a0 = tensors["a0"][off : off + length]
        rv = tensors["rv"][off : off + length]
        own = {name: tensors[FEATURE_PREFIX + name][off : off + length] for name in features}
        if check_finite:
            for name, values in (("a0", a0), ("rv", rv), *own.items()):
                _check_vector(name, values, str(e["id"]), shard_path)
        grid = e.get("grid")
        samples.append(
            CachedSample(
                id=str(e["id"]),
                data=data,
                a0=a0,
                rv=rv,
                grid=None if grid is None else (int(grid[0]), int(grid[1]), int(grid[2])),
                correct=e.get("correct"),
                answer=e.get("answer"),
                features=own,
            )
        )
    return samples


class CacheReader:
    """Merged, verified view of one or more cache directories.

    `dirs`: a directory or a list of them (e.g. the part-directories of a SLURM job); each must
    hold a meta.json matching `expect_meta` (keys model / data / modality / config_hash, None = any)
    and the directories must agree with each other on model and modality.  Duplicate ids keep
    the first occurrence.  `features`: the per-token features to load as well (`CachedSample.features`).
    """

    def __init__(
        self,
        dirs: str | Path | Iterable[str | Path],
        expect_meta: Mapping[str, Any] | None = None,
        check_finite: bool = True,
        features: Sequence[str] = (),
    ):
        if isinstance(dirs, (str, Path)):
            dirs = [dirs]
        self.dirs = [Path(d) for d in dirs]
        self.features = tuple(features)
        if not self.dirs:
            raise InputError("no cache directory given")
        self.metas: list[dict[str, Any]] = []
        self.samples: list[CachedSample] = []
        seen: dict[str, Path] = {}  # "<data>/<id>" -> the directory it was first read from
        duplicates = 0
        for directory in self.dirs:  # one directory at a time, so the first bad one is the one named
            meta = self._add_meta(directory, expect_meta)
            by_shard, skipped = _new_entries_by_shard(directory, str(meta["data"]), seen)
            duplicates += skipped
            for shard_name in sorted(by_shard):
                self.samples += _shard_samples(
                    directory / shard_name, by_shard[shard_name], str(meta["data"]), check_finite, self.features
                )
        if duplicates:
            log.warning("%d duplicate sample ids across cache parts ignored (first kept)", duplicates)
        if not self.samples:
            raise InputError(f"cache is empty (no indexed samples): {self}")
        # a stable order independent of the shard layout
        self.samples.sort(key=lambda s: (s.data, s.id))

    def _add_meta(self, directory: Path, expect_meta: Mapping[str, Any] | None) -> dict[str, Any]:
        """Read and check `directory`'s meta.json; parts of one cache must share model and modality,
        as their vectors are merged into one training set."""
        meta = read_meta(directory)
        check_meta(meta, expect_meta, directory)
        if self.metas:
            for key in ("model", "modality"):
                if meta.get(key) != self.metas[0].get(key):
                    raise InputError(
                        f"cache {directory}: {key}={meta.get(key)!r} differs from {self.dirs[0]} "
                        f"({key}={self.metas[0].get(key)!r})"
                    )
        self.metas.append(meta)
        return meta

    @property
    def meta(self) -> dict[str, Any]:
        return self.metas[0]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> CachedSample:
        return self.samples[i]

    def __str__(self) -> str:
        """Its directories, as error messages name a cache."""
        return ", ".join(str(d) for d in self.dirs)

    def __iter__(self) -> Iterator[CachedSample]:
        return iter(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]


__all__ = [
    "CACHE_FORMAT",
    "FEATURE_PREFIX",
    "CacheWriter",
    "CacheReader",
    "CachedSample",
    "make_meta",
    "read_meta",
    "check_meta",
    "config_hash",
    "part_name",
]
