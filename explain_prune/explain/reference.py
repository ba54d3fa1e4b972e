"""Naive reference for Eq. 1, written for clarity, not speed: the tests and the relevance
benchmark compare `relevance` against it.

Per answer token: one backward, then the full N x N relevance matrix updated layer 0 -> L-1
exactly as printed, R <- R + Ā_l R, and the predicting position's row read at the visual tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from explain_prune.models.base import VisualPrompt, VLM


def naive_relevance(
    vlm: VLM, prompt: VisualPrompt, answer_ids: Sequence[int], head_reduce: str = "grad", clamp: bool = True
) -> torch.Tensor:
    answer = list(answer_ids)
    fed = torch.tensor([answer[:-1]], dtype=torch.long)
    embeds = torch.cat([prompt.inputs_embeds, vlm.embed_text(fed).to(prompt.inputs_embeds.dtype)], dim=1)
    positions = torch.cat([prompt.position_ids, prompt.next_positions(len(answer) - 1)], dim=-1)
    with vlm.attention_implementation("eager"), torch.enable_grad():
        out = vlm.model(inputs_embeds=embeds.detach().requires_grad_(True), position_ids=positions,
                        output_attentions=True, use_cache=False)
    attentions = out.attentions
    length = embeds.shape[1]
    rows = []
    for t, token in enumerate(answer):
        position = prompt.length - 1 + t
        if head_reduce == "grad":
            grads = torch.autograd.grad(out.logits[0, position, token], attentions, retain_graph=True)
        relevance_matrix = torch.eye(length, dtype=attentions[0].dtype)
        for layer, attention in enumerate(attentions):
            a = attention[0].detach()
            if head_reduce == "grad":
                cam = a * grads[layer][0]
                if clamp:
                    cam = cam.clamp(min=0)
                a_bar = cam.mean(0)
            else:
                a_bar = a.mean(0)
            relevance_matrix = relevance_matrix + a_bar @ relevance_matrix
        rows.append(relevance_matrix[position, prompt.visual_index])
    return torch.stack(rows).mean(0).float()
