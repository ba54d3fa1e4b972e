"""Vision-tower attention statistics for text-agnostic token selection before the LLM (VisionZip).

The towers run with sdpa / flash attention, which return no attention maps, so the map of the one
block a method needs is recomputed from that block's own q / k: a forward pre-hook records what its
attention module received during the adapter's normal vision forward, then the scores are formed one
head at a time (memory n x n per head).  Each adapter (models/<family>.py, `vision_token_scores`)
projects q / k with its tower's weights and pools the per-patch statistics onto its LLM tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from explain_prune.core import InputError


def vision_block(blocks: nn.ModuleList, layer: int) -> nn.Module:
    """blocks[layer] (negative counts from the end), or InputError naming the bad index."""
    if not -len(blocks) <= int(layer) < len(blocks):
        raise InputError(f"vision_layer {layer} is outside a {len(blocks)}-block vision tower")
    return blocks[int(layer)]


def capture_call(module: nn.Module, run: Callable[[], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of the single call `run()` makes to `module`."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    handle = module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if len(calls) != 1:
        raise RuntimeError(f"expected one call of the vision attention module, saw {len(calls)}")
    return calls[0]


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [H, n, head_dim] of one attention window -> [n]: the attention each token receives,
    averaged over heads and over all n queries (the no-[CLS] substitute for VisionZip's
    [CLS]->patch attention)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    received = torch.zeros(q.shape[1], dtype=dtype, device=q.device)
    for h in range(q.shape[0]):
        probs = torch.softmax((q[h].to(dtype) @ k[h].to(dtype).T) * scale, dim=-1)  # [n, n]
        received += probs.mean(0)
    return received / q.shape[0]


@torch.no_grad()
def siglip_token_stats(tower: nn.Module, layer: int, run: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip statistics at SigLIP encoder layer `layer` of `tower` (a SiglipVisionModel), for every
    image / tile / frame `run()` feeds it: (received attention [B, n], head-mean keys [B, n, head_dim])."""
    attn = vision_block(tower.encoder.layers, layer).self_attn
    args, kwargs = capture_call(attn, run)
    if kwargs.get("attention_mask") is not None:
        raise RuntimeError("SigLIP vision attention was called with a mask; the recomputed map would ignore it")
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, n, C] after layer_norm1
    shape = (*x.shape[:-1], attn.num_heads, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)  # [B, H, n, hd]
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    received = torch.stack([received_attention(q[b], k[b], attn.scale) for b in range(x.shape[0])])
    return received, k.mean(1).to(received.dtype)
