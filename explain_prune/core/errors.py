"""The two error types every layer raises: a bad input (fatal, one line) and a bad sample (a counted skip)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("explain_prune")


class InputError(ValueError):
    """Bad user input (a missing file, an unreadable video, an empty question ...).

    Entry points print its one-line message and exit non-zero; bulk jobs count it as a skip.
    """


class RowError(ValueError):
    """One record of a dataset or benchmark cannot become a sample; its reader yields a SampleError
    carrying this message in the record's place."""


@dataclass
class SampleError:
    """A row of a dataset or benchmark that could not be read: counted with its reason, never scored."""

    id: str
    reason: str


def skip_or_raise(sample_id: str, reason: str, strict: bool, setting: str = "strict=true") -> None:
    """A bad sample in a bulk job: under `strict` one InputError line naming it (and the setting that
    made it fatal), else a logged skip the caller counts."""
    if strict:
        raise InputError(f"sample {sample_id!r}: {reason} ({setting})")
    log.warning("skipping sample %r: %s", sample_id, reason)
