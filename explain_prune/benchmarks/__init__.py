"""Benchmarks: each module registers its class with `@BENCHMARKS.register(name)` (the name of its
conf/benchmark/<name>.yaml); importing the module here is what makes it available.
`build_benchmark(name, root, **options)` checks the options against the class's `__init__`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from explain_prune.benchmarks import (  # noqa: F401  (importing a module registers its benchmark)
    activitynetqa,
    mmbench_video,
    mme,
    mmstar,
    mmvet,
    mvbench,
    nextqa,
    pope,
    seedbench,
    synthetic,
    videomme,
)
from explain_prune.benchmarks.base import BENCHMARKS, Benchmark, Record
from explain_prune.benchmarks.judge import (
    FakeJudge,
    Judge,
    OpenAICompatibleJudge,
    build_judge,
)
from explain_prune.core import SampleError



def build_benchmark(name: str, root: str | Path | None = None, family: str | None = None, **opts: Any) -> Benchmark:
    """`BENCHMARKS[name](root, **opts)` building its prompts for model `family` (`Benchmark.family`);
    an unknown name or option is an InputError.

    A `name` key in `opts` (as when a whole `benchmark` config is splatted) is ignored."""
    opts.pop("name", None)
    benchmark = BENCHMARKS.build(name, root, where="benchmark", **opts)
    benchmark.family = family
    return benchmark


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "FakeJudge",
    "Judge",
    "OpenAICompatibleJudge",
    "Record",
    "SampleError",
    "build_benchmark",
    "build_judge",
]
