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


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _process_umask()  # read once at import: os.umask can only be read by setting it


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the process umask (0644 under the usual 022)."""
    return 0o666 & ~UMASK


def publish(tmp: Path, path: Path) -> None:
    """Give a finished temp file the umask's mode, fsync it, and rename it over `path`: readers see
    the old or the new file, never half.  Writers that create the temp file with a restrictive mode
    (safetensors, `tempfile.mkstemp`: 0600) would otherwise hide caches and checkpoints from the
    other users of a shared cluster."""
    os.chmod(tmp, default_file_mode())
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temp_name(path: Path) -> Path:
    """The hidden temp file next to `path` that this process writes before `publish`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename (see `publish`)."""
    tmp = temp_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
    publish(tmp, path)


def save_safetensors_atomic(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomic and with the umask's file mode."""
    from safetensors.torch import save_file

    tmp = temp_name(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
