"""Reading a sweep: one `Job` per results.json, keyed by what its saved config says it ran."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from explain_prune.core import RESULTS, InputError


@dataclass
class Job:
    """One results.json."""

    path: Path
    model: str
    modality: str  # the benchmark's: the experiment's modality_of entry, else the job's modality group
    modality_of: dict[str, str]  # the experiment's benchmark -> modality map (empty outside experiments)
    settings: dict[str, Any]  # the model's input budget for that modality (pixels, frames, ...)
    method: str
    variant: str  # the experiment arm's `variant` (fastv_l1, gae_mean, ...), else the method name
    options: dict[str, Any]
    retention: float
    benchmark: str
    score: float | None
    efficiency: dict[str, Any]
    experiment: dict[str, Any] | None

    @property
    def settings_key(self) -> str:
        return json.dumps(self.settings, sort_keys=True, default=str)


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if OmegaConf.is_config(value):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:  # an interpolation that only resolves inside the job (${hydra:...})
            return OmegaConf.to_container(value, resolve=False)
    return value


def input_settings(cfg: DictConfig, modality: str) -> dict[str, Any]:
    """The scalar settings of the model's `<modality>:` block (pixel budget, frames, sampling, ...),
    with the modality group's own values winning when the group is that modality, as the model adapters
    apply them (a sweep's video group and its frame count leave its image benchmarks' input alone)."""
    block = _select(cfg, f"model.{modality}") or {}
    group = _select(cfg, "modality") or {}
    settings = {k: v for k, v in block.items() if not isinstance(v, (dict, list))}
    if group.get("name", modality) == modality:
        settings.update({k: v for k, v in group.items() if k != "name" and v is not None and not isinstance(v, (dict, list))})
    return settings


def _read_job(path: Path) -> Job:
    data = json.loads(path.read_text())
    missing = [k for k in ("model", "method", "benchmark", "retention", "score", "efficiency") if k not in data]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    config = data.get("config") or {}
    cfg = OmegaConf.create(config)
    # an experiment sweeps image and video benchmarks under one modality group (Table 1: video, whose
    # frame count image benchmarks ignore); its modality_of map says which each benchmark is
    modality_of = {str(b): str(m) for b, m in (_select(cfg, "modality_of") or {}).items()}
    group = _select(cfg, "modality.name") or (data.get("choices") or {}).get("modality") or "image"
    modality = modality_of.get(str(data["benchmark"]), str(group))
    experiment = config.get("experiment")
    return Job(
        path=path,
        model=str(data["model"]),
        modality=modality,
        modality_of=modality_of,
        settings=input_settings(cfg, modality),
        method=str(data["method"]),
        variant=str(_select(cfg, "variant") or data["method"]),
        options=dict(_select(cfg, "method.options") or {}),
        retention=float(data["retention"]),
        benchmark=str(data["benchmark"]),
        score=(data["score"] or {}).get("overall"),
        efficiency=dict(data["efficiency"]),
        experiment=dict(experiment) if isinstance(experiment, Mapping) else None,
    )


def collect_jobs(sweep_dir: str | Path, warnings: list[str]) -> list[Job]:
    """Every readable results.json under sweep_dir; unreadable ones are skipped with a warning."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise InputError(f"report: sweep dir {root} is not a directory")
    paths = sorted(root.rglob(RESULTS))
    if not paths:
        raise InputError(f"report: no {RESULTS} under {root} (pass the sweep dir of an evaluate run)")
    jobs = []
    for path in paths:
        try:
            jobs.append(_read_job(path))
        except (OSError, ValueError, TypeError, AttributeError, OmegaConfBaseException) as err:
            warnings.append(f"skipping {path}: not a readable evaluate {RESULTS} ({err})")
    if not jobs:
        raise InputError(f"report: none of the {len(paths)} {RESULTS} files under {root} is readable")
    return jobs
