"""The shared bottom layer: errors, `Sample`, atomic writes. It imports nothing else from the project."""

from explain_prune.core.errors import InputError, SampleError, skip_or_raise
from explain_prune.core.io import (
    fsync_dir,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from explain_prune.core.sample import Sample, load_image

__all__ = [
    "InputError",
    "Sample",
    "SampleError",
    "fsync_dir",
    "load_image",
    "read_json",
    "skip_or_raise",
    "write_bytes_atomic",
    "write_json_atomic",
]
