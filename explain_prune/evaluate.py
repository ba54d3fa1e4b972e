"""Evaluate a pruning method on a benchmark: `python -m explain_prune.evaluate [overrides]`."""

from __future__ import annotations

import json

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from explain_prune.benchmarks import build_benchmark, build_judge
from explain_prune.benchmarks.runner import EvalSettings, evaluate
from explain_prune.cli import task
from explain_prune.methods import build_from_config
from explain_prune.models import build_vlm


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@task
def main(cfg: DictConfig) -> dict:
    method = build_from_config(cfg.method, retention=cfg.retention)
    benchmark = build_benchmark(**OmegaConf.to_container(cfg.benchmark, resolve=True))
    judge = build_judge(cfg.judge)
    vlm = build_vlm(cfg.model, modality=cfg.modality)
    settings = EvalSettings(
        limit=cfg.benchmark.get("limit"), strict=cfg.strict, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
    )
    run_info = {
        "model": cfg.model.name,
        "retention": float(cfg.retention),
        "choices": dict(HydraConfig.get().runtime.choices),
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    out_dir = HydraConfig.get().runtime.output_dir
    results = evaluate(vlm, benchmark, method, out_dir, settings, cfg.model.llm, judge=judge, run_info=run_info)
    print(json.dumps({"score": results["score"].get("overall"), "efficiency": results["efficiency"]}, default=str))
    print(f"results: {out_dir}/results.json")
    return results


if __name__ == "__main__":
    main()
