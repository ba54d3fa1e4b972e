"""The retention ratio and the keep-count rules every method, the engine and the labels share
(docs/design.md §Keep-count rule): k = max(1, rule(r · N_v)), never more than N_v, 0 for no tokens.

`rule` is "round" (half to even; the project's rule and llava-hf FastV's) or "int" (truncation, as
PyramidDrop's and lmms-eval's code compute `int(N * ratio)`).  Each method names its rule in its config."""

from __future__ import annotations

import math
from typing import Any, overload

import torch

from explain_prune.core.errors import InputError


COUNT_RULES = ("round", "int")


def check_retention(retention: Any) -> float:
    """A retention ratio in (0, 1], else InputError."""
    try:
        value = float(retention)
    except (TypeError, ValueError):
        raise InputError(f"retention must be a number in (0, 1], got {retention!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise InputError(f"retention must be in (0, 1], got {retention!r}")
    return value


@overload
def keep_count(ratio: float, n_visual: int, rule: str = "round") -> int: ...
@overload
def keep_count(ratio: float, n_visual: torch.Tensor, rule: str = "round") -> torch.Tensor: ...
def keep_count(ratio: float, n_visual: int | torch.Tensor, rule: str = "round") -> int | torch.Tensor:
    """Tokens kept of `n_visual` at `ratio`; `n_visual` may be a LongTensor of per-sample counts [B].

    Both forms compute in float64 as Python does (`round` and `torch.round` both round half to even;
    `int` and `torch.floor` agree on the non-negative products)."""
    if rule not in COUNT_RULES:
        raise InputError(f"count_rule must be one of {', '.join(COUNT_RULES)}, got {rule!r}")
    if isinstance(n_visual, torch.Tensor):
        product = n_visual.to(torch.float64) * float(ratio)
        k = (torch.round(product) if rule == "round" else torch.floor(product)).to(torch.long)
        return torch.where(n_visual > 0, k.clamp(min=1), torch.zeros_like(k)).minimum(n_visual)
    n_visual = int(n_visual)
    if n_visual <= 0:
        return 0
    product = n_visual * float(ratio)
    return min(max(1, round(product) if rule == "round" else int(product)), n_visual)
