"""The shared bottom layer: errors, `Sample`, atomic writes. It imports nothing else from the project."""

from explain_prune.core.errors import InputError, RowError, SampleError, skip_or_raise
from explain_prune.core.io import (
    RESULTS,
    default_file_mode,
    fsync_dir,
    jsonable,
    read_json,
    publish,
    resolve_data_root,
    save_safetensors_atomic,
    temp_name,
    write_bytes_atomic,
    write_json_atomic,
)
from explain_prune.core.sample import DeferredSample, Sample, load_image, sample_seed

__all__ = [
    "RESULTS",
    "DeferredSample",
    "InputError",
    "RowError",
    "Sample",
    "SampleError",
    "default_file_mode",
    "fsync_dir",
    "jsonable",
    "load_image",
    "sample_seed",
    "read_json",
    "publish",
    "resolve_data_root",
    "save_safetensors_atomic",
    "skip_or_raise",
    "temp_name",
    "write_bytes_atomic",
    "write_json_atomic",
]
