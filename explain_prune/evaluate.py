"""Evaluate a pruning method on a benchmark: `python -m explain_prune.evaluate [overrides]`.

A job whose run dir already holds complete results for the same resolved settings returns at once
(without loading the model), so rerunning an interrupted sweep only runs the missing jobs.  Each
finished job is mirrored to one W&B run (the `wandb:` block of conf/evaluate.yaml; offline by default).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from explain_prune import tracking
from explain_prune.benchmarks import build_benchmark, build_judge
from explain_prune.stages.evaluate import EvalSettings, evaluate
from explain_prune.cli import checked_choices, task
from explain_prune.core.lock import DirLock
from explain_prune.data.prefetch import resolve_num_workers
from explain_prune.methods import build_from_config
from explain_prune.models import build_vlm


LOCK_FILE = ".lock"


@checked_choices
@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@task
def main(cfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    choices = dict(HydraConfig.get().runtime.choices)
    method = build_from_config(cfg.method)
    method.check_runnable()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    secrets = tracking.secret_values(resolved)
    job = tracking.scrub(tracking.job_identity(cfg, method.retention), secrets)
    done = tracking.completed_results(out_dir, job)
    if done is not None:  # a rerun of an interrupted sweep: nothing to do for this job
        print(f"skip: {out_dir} already holds complete results for this job")
        print(f"results: {out_dir}/results.json")
        return done
    with DirLock(out_dir / LOCK_FILE, f"evaluate run dir {out_dir}"):  # one job per run dir at a time
        tracking.claim_run_dir(out_dir, job)
        benchmark = build_benchmark(**OmegaConf.to_container(cfg.benchmark, resolve=True), family=cfg.model.family)
        judge = build_judge(cfg.judge)
        vlm = build_vlm(cfg.model, modality=cfg.modality)
        settings = EvalSettings(
            limit=cfg.benchmark.get("limit"),
            strict=cfg.strict,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            num_workers=resolve_num_workers(cfg.num_workers),
        )
        run_info = {
            "model": cfg.model.name,
            "retention": method.retention,
            "choices": choices,
            "config": tracking.scrub(OmegaConf.to_container(cfg, resolve=False), secrets),
            "job": job,
        }
        results = evaluate(vlm, benchmark, method, out_dir, settings, cfg.model.llm, judge=judge, run_info=run_info)
        wandb_config = tracking.scrub({**resolved, "choices": choices}, secrets)
        tracking.log_evaluation(resolved["wandb"], results, wandb_config, out_dir)
        print(json.dumps({"score": results["score"].get("overall"), "efficiency": results["efficiency"]}, default=str))
        print(f"results: {out_dir}/results.json")
    return results


if __name__ == "__main__":
    main()
