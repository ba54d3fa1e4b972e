"""Rough A100 GPU-hours of the paper experiments (conf/experiment/*.yaml) — an estimate, not a measurement.

    python scripts/estimate_gpu_hours.py [table2 table3 ...]        # default: every experiment

The sweep of each experiment is read from its composed config (models x benchmarks x arms, the arms
composed with Hydra as `evaluate experiment=<name>` composes them).  Per job:

    hours = (samples x (prefill + decode) + LOAD_S) / 3600
    prefill = PREFILL_S x FLOPs(job) / FLOPs(Qwen2-VL, 1302 visual tokens, vanilla)
    decode  = DECODE_S[short|long answers]

The anchors are the paper's own A100 timings of vanilla Qwen2-VL: Table 4 (MMStar, 1500 questions:
prefill 6min36s -> 0.264 s, total 15min24s -> decode 0.352 s per question) and Table 11 (MM-Vet, 218
questions: 7min58s total, 1min30s prefill -> decode 1.780 s).  FLOPs(job) is explain_prune.flops'
Eq. 4 count for the arm's method at the job's visual-token count n: App. B's budget for Tables 1-6
(images: Qwen2-VL 1500, LLaVA-OV 1849, VILA1.5 196; 8-frame videos: 1296 / 1569 / 1568) or App. C's
reference for the larger inputs (images 1302 / 1728; videos 5824 / 6272 / 3136).  The relevance oracle
(gae) adds its unpruned answer (a full prefill + decode) and Eq. 1: one forward plus one backward
(taken as 2 forwards) per answer token over all tokens, (1 + 2 T) full prefills with T = 2 answer
tokens (32, its max_new_tokens, on MM-Vet / MMBench-Video).  Not counted: video decoding and judge
calls (CPU / network), text tokens, eager-attention overheads; LOAD_S = 60 s per job for loading the
model.  Benchmark sizes are the full releases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import explain_prune.cli  # noqa: F401  (registers the config resolvers)
from explain_prune.engine.flops import llm_flops, method_report
from explain_prune.methods import build_from_config

CONF = Path(__file__).resolve().parents[1] / "conf"
PREFILL_S = 396 / 1500
DECODE_S = {"short": (924 - 396) / 1500, "long": (478 - 90) / 218}
LONG_ANSWERS = {"mmvet", "mmbench_video"}
LOAD_S = 60.0
SAMPLES = {"mme": 2374, "mmstar": 1500, "mmvet": 218, "seedbench": 14233, "pope": 5127, "videomme": 2700,
           "mvbench": 4000, "mmbench_video": 1998, "nextqa_mc": 8564, "nextqa_oe": 9178, "activitynetqa": 8000}
VISUAL_TOKENS = {  # (inputs, model, modality) -> n
    **{("app_b", m, "image"): n for m, n in (("qwen2vl", 1500), ("llava_ov", 1849), ("vila15", 196))},
    **{("app_b", m, "video"): n for m, n in (("qwen2vl", 1296), ("llava_ov", 1569), ("vila15", 1568))},
    **{("large", m, "image"): n for m, n in (("qwen2vl", 1302), ("llava_ov", 1728), ("vila15", 196))},
    **{("large", m, "video"): n for m, n in (("qwen2vl", 5824), ("llava_ov", 6272), ("vila15", 3136))},
}
ANCHOR_FLOPS = llm_flops(OmegaConf.load(CONF / "model" / "qwen2vl.yaml").llm, 1302)


def sweep_values(cfg) -> dict[str, list]:
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    return {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()] for o in parsed}


def job_seconds(method, dims, n: int, benchmark: str) -> float:
    answers = "long" if benchmark in LONG_ANSWERS else "short"
    full_prefill = PREFILL_S * llm_flops(dims, n) / ANCHOR_FLOPS
    seconds = PREFILL_S * method_report(dims, method, n)["flops_T"] * 1e12 / ANCHOR_FLOPS + DECODE_S[answers]
    if method.name == "gae":
        answer_tokens = 32 if answers == "long" else 2
        seconds += full_prefill + DECODE_S[answers] + (1 + 2 * answer_tokens) * full_prefill
    return SAMPLES[benchmark] * seconds


def estimate(name: str) -> tuple[int, int, float]:
    """(jobs, samples, GPU hours) of one experiment."""
    cfg = compose("evaluate", overrides=[f"experiment={name}"], return_hydra_config=True)
    sweep = sweep_values(cfg)
    inputs = "large" if "large_inputs" in cfg else "app_b"
    jobs = samples = 0
    seconds = 0.0
    for arm in sweep["experiment/arm"]:
        overrides = [f"experiment={name}", f"+experiment/arm=[{','.join(arm)}]"]
        if "ours" in arm:  # FLOPs need no trained f_θ
            overrides.append("method.options.checkpoint=null")
        arm_cfg = compose("evaluate", overrides=overrides)
        method = build_from_config(arm_cfg.method)
        for model in sweep["model"]:
            dims = OmegaConf.load(CONF / "model" / f"{model}.yaml").llm
            for benchmark in sweep["benchmark"]:
                n = VISUAL_TOKENS[(inputs, model, cfg.modality_of[benchmark])]
                seconds += job_seconds(method, dims, n, benchmark) + LOAD_S
                jobs += 1
                samples += SAMPLES[benchmark]
    return jobs, samples, seconds / 3600


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", help="experiment names (default: all)")
    args = parser.parse_args(argv)
    stems = [p.stem for p in (CONF / "experiment").glob("*.yaml")]
    known = sorted(stems, key=lambda s: (not s.startswith("table"), int(s.lstrip("abcdefghijklmnopqrstuvwxyz"))))
    unknown = sorted(set(args.experiments) - set(known))
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    names = args.experiments or known
    print("| experiment | jobs | samples | A100 GPU-hours (estimate) |\n|---|---|---|---|")
    total = 0.0
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for name in names:
            jobs, samples, hours = estimate(name)
            total += hours
            print(f"| {name} | {jobs} | {samples:,} | {hours:.0f} |")
    print(f"| total | | | {total:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
