"""Benchmark registry: `BENCHMARKS[name]` is a `Benchmark` class; `build_benchmark` instantiates one.

Add a benchmark by importing its class here and adding one `BENCHMARKS` entry (the key is the
`conf/benchmark/<key>.yaml` name and the class's `name`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from explain_prune.benchmarks.activitynetqa import ActivityNetQA
from explain_prune.benchmarks.base import Benchmark, Record
from explain_prune.benchmarks.judge import (
    FakeJudge,
    Judge,
    OpenAICompatibleJudge,
    build_judge,
)
from explain_prune.benchmarks.mmbench_video import MMBenchVideo
from explain_prune.benchmarks.mme import MME
from explain_prune.benchmarks.mmstar import MMStar
from explain_prune.benchmarks.mmvet import MMVet
from explain_prune.benchmarks.mvbench import MVBench
from explain_prune.benchmarks.nextqa import NExTQAMC, NExTQAOE
from explain_prune.benchmarks.pope import POPE
from explain_prune.benchmarks.seedbench import SEEDBenchIMG
from explain_prune.benchmarks.synthetic import SyntheticBenchmark
from explain_prune.benchmarks.videomme import VideoMME
from explain_prune.core import InputError, SampleError

BENCHMARKS: dict[str, type[Benchmark]] = {
    "mme": MME,
    "pope": POPE,
    "mmstar": MMStar,
    "seedbench": SEEDBenchIMG,
    "mmvet": MMVet,
    "synthetic": SyntheticBenchmark,  # generated grid VQA with ground-truth tokens (no data root)
    # video
    "videomme": VideoMME,
    "mvbench": MVBench,
    "mmbench_video": MMBenchVideo,
    "nextqa_mc": NExTQAMC,
    "nextqa_oe": NExTQAOE,
    "activitynetqa": ActivityNetQA,
}


def build_benchmark(name: str, root: str | Path | None = None, **opts: Any) -> Benchmark:
    """`BENCHMARKS[name](root, **opts)`; an unknown name or option is an InputError.

    A `name` key in `opts` (as when a whole `benchmark` config is splatted) is ignored."""
    opts.pop("name", None)
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    try:
        return BENCHMARKS[name](root, **opts)
    except TypeError as err:
        raise InputError(f"bad options for benchmark {name!r} {sorted(opts)}: {err}") from err


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
