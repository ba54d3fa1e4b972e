"""Attention rows recomputed from a decoder layer's own q/k projections.

Methods that rank tokens by attention (ours: A_v^0, FastV, PDrop) need a few rows of one layer's
attention map.  Computing them here from the layer weights means the model itself may run with
sdpa / flash attention: only the requested query rows are formed (Q x n, never n x n unless asked).
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, n, hd], cos/sin [n, hd] (the layout the HF rotary modules return, batch removed)."""
    return x * cos[None] + _rotate_half(x) * sin[None]


def rotary_cos_sin(rotary_emb: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """cos, sin [n, hd] for one sample's positions ([n] or M-RoPE [3, n])."""
    pos = position_ids[:, None, :] if position_ids.dim() == 2 else position_ids[None, :]
    cos, sin = rotary_emb(hidden[None], pos)
    return cos[0], sin[0]


def query_key_states(
    layer: nn.Module,
    rotary_emb: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    query_index: torch.Tensor | None,
    rope: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Post-RoPE queries [H, Q, hd] (for query_index) and keys [KVH, n, hd] of one sample
    (rope=False: before the rotary embedding, as PruneVid scores).

    hidden is the residual stream entering `layer` ([n, d]); the layer's input norm is applied here.
    """
    attn = layer.self_attn
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    cos, sin = rotary_cos_sin(rotary_emb, x, position_ids)
    keys = attn.k_proj(x).view(x.shape[0], -1, head_dim).transpose(0, 1)
    if getattr(attn, "k_norm", None) is not None:
        keys = attn.k_norm(keys)
    if rope:
        keys = _rope(keys, cos, sin)
    if query_index is None:
        return None, keys
    queries = attn.q_proj(x[query_index]).view(query_index.numel(), -1, head_dim).transpose(0, 1)
    if getattr(attn, "q_norm", None) is not None:
        queries = attn.q_norm(queries)
    if rope:
        queries = _rope(queries, cos[query_index], sin[query_index])
    return queries, keys


def attention_rows(
    layer: nn.Module,
    rotary_emb: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    query_index: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of the given queries over their causal prefix: [H, Q, n].

    Each query row is normalised over all keys at or before its own position, exactly as the
    layer's attention map (eager) would be.
    """
    queries, keys = query_key_states(layer, rotary_emb, hidden, position_ids, query_index)
    heads, kv_heads = queries.shape[0], keys.shape[0]
    keys = keys.repeat_interleave(heads // kv_heads, dim=0)  # GQA: query head h uses kv head h // groups
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * layer.self_attn.scaling
    n = hidden.shape[0]
    future = torch.arange(n, device=hidden.device)[None, :] > query_index.to(hidden.device)[:, None]
    scores = scores.masked_fill(future[None], float("-inf"))
    return scores.softmax(dim=-1)
