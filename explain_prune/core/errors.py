"""The two error types every layer raises: a bad input (fatal, one line) and a bad sample (a counted skip)."""

from __future__ import annotations

from dataclasses import dataclass


class InputError(ValueError):
    """Bad user input (a missing file, an unreadable video, an empty question ...).

    Entry points print its one-line message and exit non-zero; bulk jobs count it as a skip.
    """


@dataclass
class SampleError:
    """A row of a dataset or benchmark that could not be read: counted with its reason, never scored."""

    id: str
    reason: str
