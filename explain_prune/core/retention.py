"""The retention ratio and the keep-count rule every method, the engine and the labels share
(docs/design.md §Keep-count rule): k = max(1, round(r · N_v)), never more than N_v, 0 for no tokens."""

from __future__ import annotations

import math
from typing import Any, overload

import torch

from explain_prune.core.errors import InputError


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
def keep_count(ratio: float, n_visual: int) -> int: ...
@overload
def keep_count(ratio: float, n_visual: torch.Tensor) -> torch.Tensor: ...
def keep_count(ratio: float, n_visual: int | torch.Tensor) -> int | torch.Tensor:
    """Tokens kept of `n_visual` at `ratio`; `n_visual` may be a LongTensor of per-sample counts [B].

    Both forms round half to even (Python's `round` and `torch.round` agree)."""
    if isinstance(n_visual, torch.Tensor):
        k = torch.round(n_visual.to(torch.float64) * float(ratio)).to(torch.long)
        return torch.where(n_visual > 0, k.clamp(min=1), torch.zeros_like(k)).minimum(n_visual)
    n_visual = int(n_visual)
    if n_visual <= 0:
        return 0
    return min(max(1, round(float(ratio) * n_visual)), n_visual)
