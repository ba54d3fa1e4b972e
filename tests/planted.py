"""A relevance cache with a planted A_v^0 -> R_v rule, for tests and benchmarks of the training path.

A_v^0 is a positive, spatially correlated vector summing to ~0.3 (attention mass the instruction
gives to the visual span); R_v = (smooth(A_v^0 / mean))^2 with a 5-tap kernel — a local,
non-linear rule that f_θ's receptive field (11 tokens) can represent but that the raw attention
(the A_v^0 baseline) does not match.  A test fixture (also used by scripts/bench_datamodule.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from explain_prune.data.cache import CacheWriter, make_meta

KERNEL = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]) / 9.0


def planted_rv(a0: torch.Tensor) -> torch.Tensor:
    x = (a0 / a0.mean()).view(1, 1, -1)
    smooth = F.conv1d(x, KERNEL.view(1, 1, -1), padding=2).view(-1)
    return smooth**2


def planted_a0(length: int, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(1, 1, length + 6, generator=generator)
    corr = F.conv1d(noise, torch.ones(1, 1, 7) / 7**0.5).view(-1)[:length]
    a0 = torch.exp(1.2 * corr)
    return 0.3 * a0 / a0.sum()


def write_planted_cache(
    directory: str | Path,
    num_samples: int,
    min_len: int = 40,
    max_len: int = 80,
    seed: int = 0,
    model: str = "tiny_qwen2vl",
    data: str = "synthetic",
    modality: str = "image",
    shard_size: int = 256,
    correct_every: int = 0,
    id_prefix: str = "s",
    features: bool = False,
) -> dict[str, Any]:
    """Write `num_samples` planted samples with lengths uniform in [min_len, max_len].

    correct_every=k marks every k-th sample as answered incorrectly (0: all correct).
    features=True also caches the per-token features of format 2: a0_heads [N, 2] whose mean is
    A_v^0 (one head carries R_v's rule, the other noise) and kv_norm [N, 2].
    Returns the meta written.
    """
    gen = torch.Generator().manual_seed(seed)
    meta = make_meta(model, data, modality, model_id="planted", data_source="planted-rule", config={"seed": seed})
    with CacheWriter(directory, meta, shard_size=shard_size) as writer:
        done = writer.done_ids()
        for i in range(num_samples):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
            a0 = planted_a0(length, gen)
            sid = f"{id_prefix}{i:06d}"
            if sid in done:
                continue
            correct = not (correct_every and i % correct_every == correct_every - 1)
            extra = None
            if features:
                noise = planted_a0(length, gen)
                heads = torch.stack([2 * a0 - noise.clamp(max=a0), noise.clamp(max=a0)], dim=-1)  # [N, 2], mean = a0
                extra = {"a0_heads": heads, "kv_norm": torch.rand(length, 2, generator=gen) + 0.5}
            writer.add(sid, a0, planted_rv(a0), grid=(1, 1, length), correct=correct, answer="A", features=extra)
    return meta


__all__ = ["write_planted_cache", "planted_rv", "planted_a0"]
