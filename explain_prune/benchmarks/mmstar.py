"""MMStar (Chen et al. 2024): 1,500 vision-indispensable 4-way multiple-choice questions.

Data: `$LMUData/MMStar.tsv` (VLMEvalKit format; index, image, question, A-D, answer, category,
l2-category). Prompt / extraction / scoring: see `benchmarks/mcq.py` — accuracy overall (mean over
all questions, as VLMEvalKit reports it; lmms-eval's "average" is instead the mean of the
l2-category means) and per `category` and `l2-category`.
"""

from __future__ import annotations

from explain_prune.benchmarks.mcq import VLMEvalMCQBenchmark
from explain_prune.benchmarks.base import BENCHMARKS


@BENCHMARKS.register("mmstar")
class MMStar(VLMEvalMCQBenchmark):
    tsv_name = "MMStar"
