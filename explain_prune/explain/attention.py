"""A_v^0: the layer-0 attention that the instruction tokens pay to each visual token."""

from __future__ import annotations

import torch

from explain_prune.engine.attention import attention_rows
from explain_prune.models.base import VisualPrompt, VLM


@torch.no_grad()
def first_layer_attention(vlm: VLM, prompt: VisualPrompt) -> torch.Tensor:
    """[N_v]: mean over instruction tokens and heads of their layer-0 attention to the visual tokens.

    Each instruction row is softmaxed over its whole causal prefix (system, visual and text
    tokens), as the eager map would be; only those rows are formed, from layer 0's own q/k, so
    the model may run with sdpa or flash attention.
    """
    if prompt.instruction_index.numel() == 0:
        raise ValueError(f"sample {prompt.sample_id!r} has no instruction tokens after its visual span")
    decoder = vlm.decoder
    positions = prompt.position_ids[:, 0] if prompt.position_ids.dim() == 3 else prompt.position_ids[0]
    rows = attention_rows(
        decoder.layers[0], decoder.rotary_emb, prompt.inputs_embeds[0], positions, prompt.instruction_index
    )  # [H, N_u, L]
    return rows[:, :, prompt.visual_index.to(rows.device)].mean(dim=(0, 1)).cpu()
