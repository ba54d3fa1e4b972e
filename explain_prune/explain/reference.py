"""Naive reference for Eq. 1, written for clarity, not speed: the tests and the relevance
benchmark compare `relevance` against it.

Per answer token: one backward, then the full N x N relevance matrix updated layer 0 -> L-1
exactly as printed, R <- R + Ā_l R, and the predicting position's row read at the visual tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from explain_prune.models.base import VLM, VisualPrompt


def relevance_matrix(maps: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None, clamp: bool = True) -> torch.Tensor:
    """Eq. 1 as printed: the full N x N R = (I + Ā_{L-1}) ... (I + Ā_0), updated layer 0 -> L-1 as
    R <- R + Ā_l R, with Ā_l = mean_h((A_l ⊙ G_l)^+) — or mean_h A_l when `grads` is None.
    maps, grads: one [H, N, N] per layer."""
    matrix = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    for layer, attention in enumerate(maps):
        if grads is None:
            a_bar = attention.mean(0)
        else:
            cam = attention * grads[layer]
            a_bar = (cam.clamp(min=0) if clamp else cam).mean(0)
        matrix = matrix + a_bar @ matrix
    return matrix


def naive_relevance(
    vlm: VLM, prompt: VisualPrompt, answer_ids: Sequence[int], head_reduce: str = "grad", clamp: bool = True
) -> torch.Tensor:
    answer = list(answer_ids)
    fed = torch.tensor([answer[:-1]], dtype=torch.long, device=vlm.device)
    embeds = torch.cat([prompt.inputs_embeds, vlm.embed_text(fed).to(prompt.inputs_embeds.dtype)], dim=1)
    positions = torch.cat([prompt.position_ids, prompt.next_positions(len(answer) - 1)], dim=-1)
    with vlm.attention_implementation("eager"), torch.enable_grad():
        out = vlm.model(inputs_embeds=embeds.detach().requires_grad_(True), position_ids=positions,
                        output_attentions=True, use_cache=False)
    attentions = out.attentions
    maps = [attention[0].detach() for attention in attentions]
    rows = []
    for t, token in enumerate(answer):
        position = prompt.length - 1 + t
        grads = None
        if head_reduce == "grad":
            grads = [g[0] for g in torch.autograd.grad(out.logits[0, position, token], attentions, retain_graph=True)]
        rows.append(relevance_matrix(maps, grads, clamp)[position, prompt.visual_index])
    return torch.stack(rows).mean(0).float()
