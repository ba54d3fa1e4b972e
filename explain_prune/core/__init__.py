"""The shared bottom layer: errors, `Sample`, atomic writes. It imports nothing else from the project."""

from explain_prune.core.errors import InputError, RowError, SampleError, skip_or_raise
from explain_prune.core.io import (
    RESULTS,
    fsync_dir,
    jsonable,
    read_json,
    resolve_data_root,
    write_bytes_atomic,
    write_json_atomic,
)
from explain_prune.core.sample import DeferredSample, Sample, load_image

__all__ = [
    "RESULTS",
    "DeferredSample",
    "InputError",
    "RowError",
    "Sample",
    "SampleError",
    "fsync_dir",
    "jsonable",
    "load_image",
    "read_json",
    "resolve_data_root",
    "skip_or_raise",
    "write_bytes_atomic",
    "write_json_atomic",
]
