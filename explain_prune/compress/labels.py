"""Training labels: R_v -> R_v* (paper §3.3): the bottom `mask_ratio` of each sample's visual
tokens is zeroed and the rest divided by its sum (not a softmax, which would flatten the
closely spaced relevance scores).

Ranking is deterministic: descending value, ties broken by the lower token index (a stable
sort), the same rule `topk_mask` uses for the keep sets, so the label's support is exactly the
GAE oracle's keep set at retention 1 - mask_ratio.
"""

from __future__ import annotations

import torch

from explain_prune.core import InputError
from explain_prune.core.retention import keep_count



def rank_positions(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank of every position within its row (0 = largest); padded positions rank last.

    Ties: the lower index ranks higher (stable descending sort).
    """
    filled = values.masked_fill(~mask, float("-inf"))
    order = torch.sort(filled, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def topk_mask(values: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean [B, N]: the k = max(1, round(ratio * N_b)) largest valid positions of each row."""
    lengths = mask.sum(-1)
    k = keep_count(ratio, lengths)
    return (rank_positions(values, mask) < k[:, None]) & mask


def make_label(rv: torch.Tensor, mask: torch.Tensor | None = None, mask_ratio: float = 0.5) -> torch.Tensor:
    """R_v* from R_v.

    rv: [N] or [B, N] relevance; mask: same shape, True on real visual tokens (padding excluded).
    The bottom floor(mask_ratio * N) valid positions are zeroed (at least one position is kept);
    negative relevance is clipped to 0; the kept values are divided by their sum, and if that sum is
    0 the label is uniform over the kept positions.  Padded positions are 0.
    """
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise InputError(f"label mask_ratio must be in [0, 1), got {mask_ratio}")
    single = rv.dim() == 1
    if single:
        rv = rv.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if mask is None:
        mask = torch.ones_like(rv, dtype=torch.bool)
    rv = rv.to(torch.float32)
    lengths = mask.sum(-1)
    n_zeroed = torch.floor(lengths.to(torch.float64) * float(mask_ratio)).to(torch.long)
    k = (lengths - n_zeroed).clamp(min=1).minimum(lengths)
    keep = (rank_positions(rv, mask) < k[:, None]) & mask
    kept = torch.where(keep, rv.clamp(min=0.0), torch.zeros_like(rv))
    total = kept.sum(-1, keepdim=True)
    uniform = keep.to(torch.float32) / k.clamp(min=1)[:, None].to(torch.float32)
    label = torch.where(total > 0, kept / total.clamp(min=torch.finfo(torch.float32).tiny), uniform)
    return label[0] if single else label


__all__ = ["make_label", "topk_mask", "rank_positions"]
