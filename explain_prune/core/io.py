"""Atomic file writes, JSON reads and data roots, with one-line errors: nothing half-written, every bad
file or missing setting named."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from explain_prune.core.errors import InputError

RESULTS = "results.json"  # every train and evaluate job's summary, in its run dir


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples -> lists, other objects -> str), for comparing with a saved file."""
    return json.loads(json.dumps(value, default=str))


def resolve_data_root(
    root: str | Path | None, owner: str, key: str, env_var: str | None = None, default: str | None = None
) -> Path:
    """Where a benchmark's or source's released files are: the configured `root`, else `$env_var`, else
    `default`; with none of them an InputError naming `key`.  Whether the files are there is checked by
    the lookups that follow, which name the missing file."""
    for value in (root, os.environ.get(env_var) if env_var else None, default):
        if value not in (None, ""):
            return Path(str(value)).expanduser()
    variable = f" (or the {env_var} environment variable)" if env_var else ""
    raise InputError(f"{owner}: no data root: set {key}{variable} to the directory holding the released data")


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed content of `path`; a missing, unreadable or malformed file is one InputError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"unreadable {what} {path}: {err}") from None
