"""Shared plumbing for the Hydra entry points (generate, train, evaluate, report, flops, ...)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from explain_prune.config import check_config
from explain_prune.core import InputError
from explain_prune.synthetic import register_resolvers

register_resolvers()  # ${ep.asset:...} in conf/model/synthetic.yaml must resolve in every entry point

log = logging.getLogger("explain_prune")


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`, or an experiment that sets hydra.mode)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def set_torch_threads(cfg: Any) -> None:
    """Apply a config's `torch_threads` (null: torch's default) before any model work; on a busy
    small CPU one thread is the fastest and the most stable setting."""
    threads = cfg.get("torch_threads") if hasattr(cfg, "get") else None
    if threads:
        import torch

        torch.set_num_threads(int(threads))


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def unknown_choice(overrides: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The one-line error for the first `group=option` override whose option file does not exist
    (Hydra's own message for it runs over many lines), or None.  Sweeps `a,b` are split; lists
    (`[a,b]`), Hydra's sweep functions (`choice(...)`), interpolations and quoted values are left to Hydra."""
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+~")
        group = conf_dir / key
        if not key or "." in key or any(c in value for c in "[]{}()$'\"") or not group.is_dir():
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option and not (group / f"{option}.yaml").is_file():
                return f"{key}={option}: no such option (allowed: {', '.join(options)})"
    return None


def checked_choices(entry: Callable[[], Any]) -> Callable[[], Any]:
    """Outermost decorator of a Hydra entry point: an unknown group option on the command line is one
    line and exit 2, before Hydra composes anything."""

    @functools.wraps(entry)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            error = unknown_choice(sys.argv[1:])
            if error is not None:
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
        return entry(*args, **kwargs)

    return run


def task(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task: bad input -> one line on stderr and exit code 2 (no traceback);
    always close a W&B run so multirun jobs do not leak into each other.

    In a multirun a bad job must not take the sweep down with it: the error line is printed and
    the InputError re-raised, so Hydra marks that job failed, runs the remaining ones, and exits
    non-zero at the end (a SystemExit would stop the sweep at once)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if args and isinstance(args[0], Mapping | DictConfig):
                check_config(args[0])  # one line and exit 2 for a bad setting, before any model loads
                set_torch_threads(args[0])
            return fn(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            if in_multirun():
                raise
            sys.exit(2)
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish()

    return wrapper
