"""Build a relevance cache: `python -m explain_prune.generate [overrides]` (conf/generate.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from explain_prune.cli import checked_choices, task
from explain_prune.core import write_json_atomic
from explain_prune.stages.generate import build_cache

log = logging.getLogger(__name__)


@checked_choices
@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
@task
def main(cfg: DictConfig) -> None:
    summary = build_cache(cfg)
    out = Path(cfg.cache_dir) / f"summary-part{int(cfg.shard_id):03d}of{int(cfg.num_shards):03d}.json"
    write_json_atomic(out, summary.as_dict())
    print(summary.line())
    print(f"cache: {cfg.cache_dir}")


if __name__ == "__main__":
    main()
