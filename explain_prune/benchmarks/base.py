"""The benchmark interface: read the released format, pin one prompt and one extraction rule, score.

A benchmark yields `Sample`s whose `question` is already the final prompt text (the pinned
template applied), with everything the scorer needs in `meta` (category, split, options ...).
A row that cannot be turned into a sample is yielded as a `SampleError` so the evaluator can
count it (or fail under strict=true) instead of scoring it silently wrong.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from explain_prune.core import DeferredSample, InputError, Sample, SampleError
from explain_prune.core.registry import Registry


@dataclass
class Record:
    """One scored prediction: what the evaluator appends to predictions.jsonl."""

    id: str
    prediction: str
    answer: Any
    extracted: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    sample_metrics: dict[str, Any] | None = None  # Benchmark.sample_metrics of this sample, if any


def percent(hits: float, total: int) -> float:
    """hits / total in %, 0 for no samples (every benchmark's accuracy figure)."""
    return 100.0 * hits / total if total else 0.0


def require_columns(path: Path, columns: Iterable[str], required: Iterable[str], why: str = "") -> None:
    """InputError naming the released file and every required column it lacks (`why`: a hint appended)."""
    have = sorted(columns)
    missing = sorted(set(required) - set(have))
    if missing:
        raise InputError(f"{path} lacks column(s) {missing} (columns: {have}){why}")


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: the offline stand-in judges compare these."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


BENCHMARKS: Registry = Registry("benchmark")  # every benchmark registers itself: @BENCHMARKS.register(name)


class Benchmark(abc.ABC):
    """Subclasses set the class attributes and implement load / extract / score."""

    name: str = ""
    modality: str = "image"  # "image" or "video"
    prompt_id: str = ""  # names the pinned prompt template, recorded in results.json
    extraction_id: str = ""  # names the pinned answer-extraction rule
    needs_judge: bool = False
    max_new_tokens: int = 16
    # The model family the prompts are built for: VLMEvalKit builds prompts per model (vlmeval/vlm/base.py
    # `use_custom_prompt`); Qwen2-VL has custom ones, LLaVA-OneVision and VILA use the dataset's default.
    # `build_benchmark(..., family=)` sets it from model.family; None builds Qwen2-VL's.
    family: str | None = None

    def __init__(self, root: str | Path, **options: Any):
        self.root = Path(root)
        self.options = options

    @property
    def qwen2vl_prompts(self) -> bool:
        """Whether this run uses VLMEvalKit's Qwen2-VL prompts (else the dataset defaults)."""
        return self.family in (None, "qwen2vl")

    @abc.abstractmethod
    def load(self, limit: int | None = None) -> Iterator[Sample | SampleError]:
        ...

    def stream(self, limit: int | None = None) -> Iterator[Sample | SampleError | DeferredSample]:
        """What evaluate reads (data.prefetch): `load`, unless reading a sample is work worth
        deferring to the loader's workers (`DeferredSample`)."""
        return self.load(limit)

    @abc.abstractmethod
    def extract(self, prediction: str, sample_meta: dict[str, Any]) -> Any:
        ...

    @abc.abstractmethod
    def score(self, records: list[Record], judge: Any = None) -> dict[str, Any]:
        """{"overall": float, "categories": {...}, ...} with the official aggregation."""
        ...

    def sample_metrics(self, sample_meta: dict[str, Any], visual_scores: Any) -> dict[str, Any] | None:
        """Per-sample metrics of a method's token ranking, for benchmarks that know which visual
        tokens matter (the synthetic pointing game); None (the default) records nothing.

        `visual_scores` [N_v] are the scores the method's first pruning stage ranked by, one per
        visual token of the sample in prompt order; the evaluator calls this only when that stage
        saw all N_v tokens.  The result is stored in the prediction record and handed back to
        `score` as `Record.sample_metrics`."""
        return None
