"""Train f_θ on a relevance cache: `python -m explain_prune.train [overrides]` (conf/train.yaml).

The cache read is `${paths.cache_root}/${model.name}/${data.name}/${modality.name}` (`cache_dir`),
plus `extra_cache_dirs`.  `validate_only=true ckpt_path=<ckpt> [+eval_cache=<dir>]` evaluates a
checkpoint instead (on another cache, e.g. longer sequences, when `eval_cache` is given).
The work is in explain_prune.stages.train.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from explain_prune.cli import checked_choices, task
from explain_prune.stages.train import run


@checked_choices
@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@task
def main(cfg: DictConfig) -> float | None:
    results = run(cfg, HydraConfig.get().runtime.output_dir)
    value = results.get("metrics", {}).get("val/kl")
    return None if value is None else float(value)  # the sweep objective


if __name__ == "__main__":
    main()
