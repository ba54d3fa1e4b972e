"""SEED-Bench, image part (Li et al. 2023): 4-way multiple-choice questions in 9 dimensions.

Data: `$LMUData/SEEDBench_IMG.tsv` (VLMEvalKit format; index, image, question, A-D, answer,
category). Prompt / extraction / scoring: see `benchmarks/mcq.py` — accuracy overall and per
`category` (the evaluation dimension).
"""

from __future__ import annotations

from explain_prune.benchmarks.mcq import VLMEvalMCQBenchmark
from explain_prune.benchmarks.base import BENCHMARKS


@BENCHMARKS.register("seedbench")
class SEEDBenchIMG(VLMEvalMCQBenchmark):
    tsv_name = "SEEDBench_IMG"
