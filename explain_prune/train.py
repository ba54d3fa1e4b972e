"""Train f_θ on a relevance cache: `python -m explain_prune.train [overrides]` (conf/train.yaml).

The cache read is `${paths.cache_root}/${model.name}/${data.name}/${modality.name}` (`cache_dir`),
plus `extra_cache_dirs`.  `validate_only=true ckpt_path=<ckpt> [+eval_cache=<dir>]` evaluates a
checkpoint instead (on another cache, e.g. longer sequences, when `eval_cache` is given).
The work is in explain_prune.compress.pipeline.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from explain_prune.cli import set_torch_threads, task
from explain_prune.core import InputError

PATH_KEYS = ("paths.root_dir", "paths.log_dir", "paths.cache_root")


def _path_overrides() -> list[str]:
    """The user's `paths.*` overrides, so the suggested generate command writes where we read."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (compose API)
        return []
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in PATH_KEYS]


def _is_cache(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def ensure_cache(cfg: DictConfig) -> list[Any]:
    """The cache directories this run reads.  When the data config allows it (`auto_generate:
    true`, the small synthetic default) the cache is built on the spot — or completed, if an
    interrupted run or a smaller `data.limit` left it short: generation resumes and skips the ids
    already cached.  Otherwise a missing cache is a one-line InputError naming the generate command."""
    primary = Path(str(cfg.cache_dir))
    if cfg.data.get("auto_generate", False):
        from explain_prune.explain.collect import build_cache

        state = "completing" if _is_cache(primary) else "no relevance cache yet: building"
        print(f"{state} {primary} from data={cfg.data.name} (data.auto_generate=true)")
        print(build_cache(cfg).line())
    if not _is_cache(primary):
        command = [
            "python",
            "-m",
            "explain_prune.generate",
            f"model={cfg.model.name}",
            f"data={cfg.data.name}",
            f"modality={cfg.modality.name}",
            *_path_overrides(),
        ]
        raise InputError(
            f"no relevance cache at {primary}; build it with: {' '.join(shlex.quote(c) for c in command)}"
        )
    dirs: list[Any] = [str(primary)]
    for extra in cfg.get("extra_cache_dirs") or []:
        dirs.append([str(p) for p in extra] if isinstance(extra, (list, ListConfig)) else str(extra))
    return dirs


def _eval_dirs(cfg: DictConfig) -> list[Any] | None:
    value = cfg.get("eval_cache")
    if value in (None, ""):
        return None
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    for item in items:
        if not Path(str(item)).is_dir():
            raise InputError(f"eval_cache directory not found: {item}")
    return [str(i) for i in items]


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train (or validate) and print where the results are; returns the results dict."""
    from explain_prune.compress import pipeline

    set_torch_threads(cfg)  # before the cache is built, which can be most of the work
    eval_dirs = _eval_dirs(cfg)
    if cfg.get("validate_only"):
        cache_dirs = ensure_cache(cfg) if eval_dirs is None else []
        results = pipeline.validate(cfg, cache_dirs, output_dir, eval_dirs=eval_dirs)
    else:
        if eval_dirs is not None:
            raise InputError("eval_cache is only used with validate_only=true")
        results = pipeline.fit(cfg, ensure_cache(cfg), output_dir)
    if results.get("global_rank", 0) == 0:
        for line in pipeline.summary_lines(results):
            print(line, flush=True)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@task
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    results = run(cfg, HydraConfig.get().runtime.output_dir)
    value = results.get("metrics", {}).get("val/kl")
    return None if value is None else float(value)  # the sweep objective


if __name__ == "__main__":
    main()
