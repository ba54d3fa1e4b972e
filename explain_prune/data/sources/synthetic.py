"""The synthetic grid visual-QA task (explain_prune.synthetic.generator) as a data source.

`limit` samples of the stream `seed`: sample i is `generator.make_sample(config, seed, i)`, so the
source is a pure function of (config, seed, limit) and ids are the generator's
(`synthetic-<image|video>-g<grid>c<cell>f<frames>-s<seed>-<i>`).  `generator` (optional mapping)
overrides `SyntheticConfig` fields: grid, cell_px, min_objects, max_objects, frames (> 0 makes
videos; use it with modality=video), noise, question_types.  Every sample has a reference answer
(one word of a closed set, listed in `meta["answers"]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from explain_prune.core import DeferredSample, InputError, Sample
from explain_prune.synthetic.generator import deferred_samples, make_sample, synthetic_config
from explain_prune.data.sources.common import SOURCES



@SOURCES.register("synthetic")
class SyntheticSource:

    def __init__(self, limit: int | None, seed: int = 0, generator: Mapping[str, Any] | None = None):
        if limit is None:
            raise InputError("synthetic: data.limit (the number of samples to generate) must be set")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InputError(f"synthetic: data.limit must be a positive integer, got {limit!r}")
        self.limit = limit
        self.seed = int(seed)
        self.config = synthetic_config(generator)

    def __len__(self) -> int:
        return self.limit

    def __iter__(self) -> Iterator[Sample]:
        for index in range(self.limit):
            yield make_sample(self.config, self.seed, index)

    def stream(self) -> Iterator[DeferredSample]:
        """The samples of `__iter__`, rendered only where they are read (in the loader's workers)."""
        return deferred_samples(self.config, self.seed, self.limit)

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "n": self.limit, "seed": self.seed, "generator": dataclasses.asdict(self.config)}


__all__ = ["SyntheticSource", "synthetic_config"]
