"""Bookkeeping around evaluate jobs: what a run directory holds (so a rerun skips complete jobs),
secret scrubbing, and W&B runs.

results.json stays the source of truth (docs/design.md §Results and W&B); W&B is a mirror, offline unless asked, so
everything works with no account.  Before any config is saved or logged it goes through `scrub`:
config keys ending in `_env` name an environment variable holding a secret (the judge's
`api_key_env`), and the value of that variable is masked wherever it appears, as is the value of
any key that is itself called like a secret (`api_key`, `*_token`, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from explain_prune.core import RESULTS, InputError, jsonable, write_json_atomic

MASK = "***"
SECRET_KEYS = ("api_key", "token", "password", "secret")
MIN_SECRET_LENGTH = 8  # shorter env values are not credentials; masking them would mangle ordinary text
JOB_KEYS = ("model", "modality", "benchmark", "method", "judge", "max_new_tokens")


def secret_values(config: Any) -> list[str]:
    """Values of the environment variables that `*_env` keys anywhere in `config` name."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if str(key).endswith("_env") and isinstance(value, str):
                    secret = os.environ.get(value, "")
                    if len(secret) >= MIN_SECRET_LENGTH:
                        found.append(secret)
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(config)
    return found


def _secret_key(key: Any) -> bool:
    key = str(key).lower()
    return any(key == name or key.endswith("_" + name) for name in SECRET_KEYS)


def scrub(obj: Any, secrets: Sequence[str]) -> Any:
    """A copy of a plain container with every secret value masked (see module doc)."""
    if isinstance(obj, Mapping):
        return {
            key: MASK if _secret_key(key) and value is not None and not isinstance(value, (Mapping, list)) else scrub(value, secrets)
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub(value, secrets) for value in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, MASK)
    return obj


def job_identity(cfg: DictConfig, retention: float) -> dict[str, Any]:
    """The resolved settings that determine a job's results: model, input, benchmark (with its
    limit), method and its effective retention, judge, decoding length.  Sweep values that do not
    change these (e.g. vanilla under several nominal retentions) give the same identity."""
    identity = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key] for key in JOB_KEYS}
    identity["method"] = {**identity["method"], "retention": float(retention)}
    return identity


def completed_results(out_dir: str | Path, job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The saved results when out_dir already holds a complete run of exactly this job, else None."""
    path = Path(out_dir) / RESULTS
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: run (the prediction log resumes it)
        return None
    if isinstance(saved, dict) and saved.get("complete") is True and saved.get("job") == jsonable(dict(job)):
        return saved
    return None


JOB_FILE = "job.json"


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested identities differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def claim_run_dir(out_dir: str | Path, job: Mapping[str, Any]) -> None:
    """Record which job a run dir holds (job.json), and refuse to resume another job's predictions.

    A rerun resumes predictions.jsonl, so a run dir reused by a job with other settings (e.g. a
    method option that the run_id does not name) would silently score the old job's answers.
    Only the benchmark's `limit` may change between runs: the samples it selects are the same."""
    path = Path(out_dir) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    current = jsonable(dict(job))
    if path.is_file():
        previous = json.loads(path.read_text())
        differ = [d for d in _differences(previous, current) if d != "benchmark.limit"]
        if differ:
            raise InputError(
                f"run dir {out_dir} holds predictions of a different job (differs in {', '.join(differ)}); "
                f"pick another hydra.run.dir / run_id, or delete the directory"
            )
    write_json_atomic(path, current)


def flat_scalars(prefix: str, obj: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Nested metrics -> ({"prefix/a/b": number}, {"prefix/c": list-or-other}) for W&B."""
    scalars: dict[str, float] = {}
    others: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            inner_scalars, inner_others = flat_scalars(f"{prefix}/{key}", value)
            scalars.update(inner_scalars)
            others.update(inner_others)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        scalars[prefix] = float(obj)
    elif obj is not None:
        others[prefix] = obj
    return scalars, others


def start_wandb(
    *,
    mode: str,
    project: str,
    group: str,
    job_type: str,
    name: str,
    tags: Sequence[str],
    config: Mapping[str, Any],
    directory: str | Path,
) -> Any:
    """A W&B run writing under `directory`/wandb, or None for mode `disabled` (wandb not imported).

    Console capture is off: the job's own log stays in its Hydra dir, and nothing printed (tqdm
    bars, stray text) ends up in the run files.
    """
    if mode == "disabled":
        return None
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project,
        group=group,
        job_type=job_type,
        name=name,
        tags=list(tags),
        config=dict(config),
        dir=str(directory),
        mode=mode,
        settings=wandb.Settings(console="off"),
    )


def log_evaluation(wandb_cfg: Mapping[str, Any], results: Mapping[str, Any], config: Mapping[str, Any], directory: str | Path) -> None:
    """One W&B run per evaluate job: the (scrubbed) config, score and efficiency record; finished at
    once so the next job of a multirun starts its own run."""
    if not wandb_cfg.get("enabled", True):
        return
    run = start_wandb(
        mode=str(wandb_cfg.get("mode") or "offline"),
        project=str(wandb_cfg["project"]),
        group=str(wandb_cfg["group"]),
        job_type=str(wandb_cfg.get("job_type") or "evaluate"),
        name=str(wandb_cfg["name"]),
        tags=[str(tag) for tag in wandb_cfg.get("tags") or []],
        config=config,
        directory=directory,
    )
    if run is None:
        return
    scalars, others = flat_scalars("score", results.get("score"))
    eff_scalars, eff_others = flat_scalars("efficiency", results.get("efficiency"))
    run.log({**scalars, **eff_scalars, "num_samples": results.get("num_samples"), "num_errors": results.get("num_errors")})
    run.summary.update({**others, **eff_others})
    run.finish()
