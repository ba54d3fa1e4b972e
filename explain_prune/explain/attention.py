"""A_v^0: the layer-0 attention that the instruction tokens pay to each visual token."""

from __future__ import annotations

import torch

from explain_prune.core import InputError
from explain_prune.engine.attention import attention_rows
from explain_prune.models.base import VLM, VisualPrompt

A0_QUERIES = ("instruction", "last")  # which layer-0 query rows A_v^0 averages (see first_layer_attention)


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


@torch.no_grad()
def first_layer_attention(vlm: VLM, prompt: VisualPrompt, query: str = "instruction") -> torch.Tensor:
    """[N_v]: mean over the query rows (`a0_query_index`) and heads of their layer-0 attention to the
    visual tokens.

    Each query row is softmaxed over its whole causal prefix (system, visual and text tokens), as
    the eager map would be; only those rows are formed, from layer 0's own q/k, so the model may
    run with sdpa or flash attention.
    """
    queries = a0_query_index(prompt, query)
    decoder = vlm.decoder
    positions = prompt.position_ids[:, 0] if prompt.position_ids.dim() == 3 else prompt.position_ids[0]
    rows = attention_rows(decoder.layers[0], decoder.rotary_emb, prompt.inputs_embeds[0], positions, queries)  # [H, N_u, L]
    return rows[:, :, prompt.visual_index.to(rows.device)].mean(dim=(0, 1)).cpu()
