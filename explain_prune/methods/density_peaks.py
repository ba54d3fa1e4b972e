"""DPC-kNN density peaks (Du et al. 2016), as the video methods FastVID and PruneVid both use it.

For tokens x [B, N, D]: pairwise distances d = cdist(x, x) / sqrt(D); the local density of a token
is exp(-mean of its k smallest squared distances) (itself included, at distance 0), plus a uniform
jitter of `noise` (the references add torch.rand * 1e-6 so no two densities tie; here the jitter is
drawn from a seeded generator, so a run is reproducible); a token's distance indicator is its
distance to the nearest token of higher density (the largest distance in the matrix for the densest
one).  The peak score is density * indicator: cluster centres are the tokens of highest score.
"""

from __future__ import annotations

import torch


def peak_scores(x: torch.Tensor, k: int, noise: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, D] -> (score [B, N], dist [B, N, N]) in float32 or wider."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    dist = torch.cdist(x, x) / x.shape[-1] ** 0.5
    nearest = dist.topk(min(k, x.shape[1]), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    if noise:
        jitter = torch.rand(density.shape, generator=generator, dtype=density.dtype, device="cpu")
        density = density + jitter.to(density.device) * noise
    higher = density[:, None, :] > density[:, :, None]  # [B, i, j]: j denser than i
    dist_max = dist.flatten(1).amax(-1)[:, None, None]
    indicator = torch.where(higher, dist, dist_max).amin(-1)
    return indicator * density, dist


def cluster_centres(score: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] indices of the highest peak scores, highest first (ties: the earlier token)."""
    return torch.argsort(-score, dim=-1, stable=True)[:, :count]


def assign_to_centres(dist: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[B, N] cluster of each token: its nearest centre (ties: the first centre), every centre in its own."""
    batch = torch.arange(dist.shape[0], device=dist.device)[:, None]
    labels = dist[batch, centres].argmin(1)  # [B, N]: dist[b, centres[b, c], n] over c
    labels[batch.expand_as(centres), centres] = torch.arange(centres.shape[1], device=dist.device).expand_as(centres)
    return labels


__all__ = ["assign_to_centres", "cluster_centres", "peak_scores"]
