"""Shared plumbing for the Hydra entry points (generate, train, evaluate, report, flops, ...)."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

from explain_prune.models.base import InputError
from explain_prune.synthetic import register_resolvers

register_resolvers()  # ${ep.asset:...} in conf/model/synthetic.yaml must resolve in every entry point

log = logging.getLogger("explain_prune")


def task(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task: bad input -> one line on stderr and exit code 2 (no traceback);
    always close a W&B run so multirun jobs do not leak into each other."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish()

    return wrapper
