"""A_v^0: the layer-0 attention that the instruction tokens pay to each visual token."""

from __future__ import annotations

import torch

from explain_prune.core import InputError
from explain_prune.engine.attention import attention_rows
from explain_prune.models.base import VLM, VisualPrompt

A0_QUERIES = ("instruction", "last")  # which layer-0 query rows A_v^0 averages (see first_layer_attention)
# Per-visual-token layer-0 features a compressor may read (`first_layer_features`), and their widths:
#   a0        [N_v]        A_v^0, the head mean (the paper's f_θ input)
#   a0_heads  [N_v, H]     A_v^0 per query head, before the head mean
#   kv_norm   [N_v, 2]     L2 norms of the token's layer-0 key and value, each a mean over KV heads
FIRST_LAYER_FEATURES = ("a0", "a0_heads", "kv_norm")


def a0_query_index(prompt: VisualPrompt, query: str = "instruction") -> torch.Tensor:
    """[N_u] positions whose layer-0 rows A_v^0 averages: "instruction" = the user's text after the
    visual span (the paper's A^0_{u->v}, §3.3); "last" = the last prompt position, the token that
    predicts the first answer token (FastV's query row) — an ablation of the paper's choice."""
    if query == "instruction":
        if prompt.instruction_index.numel() == 0:
            raise InputError(f"sample {prompt.sample_id!r} has no instruction tokens after its visual span")
        return prompt.instruction_index
    if query == "last":
        return torch.tensor([prompt.length - 1], dtype=torch.long, device="cpu")  # host-side, like instruction_index
    raise InputError(f"A_v^0 query {query!r} unknown (known: {', '.join(A0_QUERIES)})")


def _a0_per_head(vlm: VLM, prompt: VisualPrompt, query: str) -> torch.Tensor:
    """[H, N_v]: each head's layer-0 attention to the visual tokens, averaged over the query rows.

    Each query row is softmaxed over its whole causal prefix (system, visual and text tokens), as
    the eager map would be; only those rows are formed, from layer 0's own q/k, so the model may
    run with sdpa or flash attention.
    """
    queries = a0_query_index(prompt, query)
    decoder = vlm.decoder
    positions = prompt.position_ids[:, 0] if prompt.position_ids.dim() == 3 else prompt.position_ids[0]
    rows = attention_rows(decoder.layers[0], decoder.rotary_emb, prompt.inputs_embeds[0], positions, queries)  # [H, N_u, L]
    return rows[:, :, prompt.visual_index.to(rows.device)].mean(dim=1)


@torch.no_grad()
def first_layer_attention(vlm: VLM, prompt: VisualPrompt, query: str = "instruction") -> torch.Tensor:
    """A_v^0 [N_v]: the mean over the query rows (`a0_query_index`) and heads of their layer-0
    attention to the visual tokens."""
    return _a0_per_head(vlm, prompt, query).mean(dim=0).cpu()


@torch.no_grad()
def first_layer_features(vlm: VLM, prompt: VisualPrompt, query: str = "instruction") -> dict[str, torch.Tensor]:
    """Every `FIRST_LAYER_FEATURES` entry of the visual tokens, on the CPU: a0 [N_v], a0_heads [N_v, H],
    kv_norm [N_v, 2].  The key norm is the same before and after RoPE (a rotation); the value norm
    costs layer 0's value projection of the visual tokens, a d x d_kv product per token."""
    per_head = _a0_per_head(vlm, prompt, query)  # [H, N_v]
    layer = vlm.decoder.layers[0]
    attn = layer.self_attn
    x = layer.input_layernorm(prompt.inputs_embeds[0, prompt.visual_index.to(prompt.inputs_embeds.device)])  # [N_v, d]
    keys = attn.k_proj(x).view(x.shape[0], -1, attn.head_dim)  # [N_v, KVH, hd]
    if getattr(attn, "k_norm", None) is not None:
        keys = attn.k_norm(keys)
    values = attn.v_proj(x).view(x.shape[0], -1, attn.head_dim)
    kv_norm = torch.stack([keys.float().norm(dim=-1).mean(-1), values.float().norm(dim=-1).mean(-1)], dim=-1)
    return {"a0": per_head.mean(dim=0).cpu(), "a0_heads": per_head.transpose(0, 1).cpu(), "kv_norm": kv_norm.cpu()}
