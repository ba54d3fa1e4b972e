"""Analytic FLOPs / KV cache of one method's visual-token schedule: `python -m explain_prune.flops [overrides]`.

Prints one JSON object (`engine.flops.method_report`); no weights are loaded, the model's `llm:` widths
are enough (conf/flops.yaml).
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from explain_prune.cli import checked_choices, task
from explain_prune.core import InputError
from explain_prune.engine.flops import method_report
from explain_prune.methods import build_from_config


@checked_choices
@hydra.main(version_base="1.3", config_path="../conf", config_name="flops")
@task
def main(cfg: DictConfig) -> None:
    if cfg.get("n_visual") is None:
        raise InputError("n_visual is required (visual tokens at the LLM input), e.g. n_visual=1302")
    if "llm" not in cfg.model:
        raise InputError(f"model {cfg.model.get('name', '?')!r} has no llm: block with its widths")
    method = build_from_config(cfg.method)
    report = method_report(cfg.model.llm, method, cfg.n_visual, int(cfg.get("bytes_per_value", 2)))
    print(json.dumps({"model": str(cfg.model.get("name", "?")), **report}, default=str))


if __name__ == "__main__":
    main()
