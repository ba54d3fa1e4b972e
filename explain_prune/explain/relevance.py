"""Relevance of each visual token to the model's answer (the paper's Eq. 1, Chefer's rule).

For answer token t, predicted at position q_t, Eq. 1 builds R_t = (I + Ā_{L-1}) ... (I + Ā_0) with
Ā_l = mean_heads((A_l ⊙ ∂logit_t/∂A_l)^+), and reads the row e_{q_t}^T R_t at the visual positions.
Only that row is needed, so it is propagated as a row vector from the top layer down,
v <- v + v Ā_l, at O(N^2) per layer — never an N x N product.

The backward pass delivers ∂logit/∂A_l from the top layer down, which is exactly the order the
row propagation needs: a tensor hook on each layer's attention map folds the gradient into v the
moment it arrives and lets it go, so the memory beyond the forward pass is one layer's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from explain_prune.explain.attention import A0_QUERIES
from explain_prune.models.base import VLM, VisualPrompt

HEAD_REDUCTIONS = ("grad", "mean")


@dataclass
class RelevanceSettings:
    """conf/relevance/*.yaml: the settings that determine a cached R_v (part of the cache's config hash)."""

    head_reduce: str = field(default="grad", metadata={"choices": HEAD_REDUCTIONS})
    clamp: bool = True
    include_eos: bool = False  # count the end-of-turn token as an answer token
    max_new_tokens: int = field(default=32, metadata={"minimum": 1})
    batch_tokens: int = field(default=1, metadata={"minimum": 1})  # answer tokens per backward pass (scripts/bench_relevance.py)
    a0_query: str = field(default="instruction", metadata={"choices": A0_QUERIES})  # instruction (paper) | last (ablation)


def teacher_forced_attentions(
    vlm: VLM, prompt: VisualPrompt, answer_ids: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Eager forward over prompt + answer[:-1] with the attention maps kept in the graph.

    Returns (answer logits [T] — the logit of answer token t at the position predicting it —,
    attention maps per layer [1, H, N, N], predicting positions [T]).
    """
    answer = torch.as_tensor(list(answer_ids), dtype=torch.long, device=vlm.device)
    n_answer = int(answer.numel())
    fed = answer[:-1].view(1, -1)
    embeds = torch.cat([prompt.inputs_embeds, vlm.embed_text(fed).to(prompt.inputs_embeds.dtype)], dim=1)
    positions = torch.cat([prompt.position_ids, prompt.next_positions(n_answer - 1).to(prompt.position_ids.device)], -1)
    embeds = embeds.detach().requires_grad_(True)  # builds the graph without parameter grads
    with vlm.attention_implementation("eager"), torch.enable_grad():
        out = vlm.model(
            inputs_embeds=embeds,
            position_ids=positions,
            output_attentions=True,
            use_cache=False,
            logits_to_keep=n_answer,
        )
    predicting = torch.arange(prompt.length - 1, prompt.length - 1 + n_answer, device=vlm.device)
    logits = out.logits[0, -n_answer:].gather(-1, answer[:, None]).squeeze(-1)
    return logits, list(out.attentions), predicting


def _fold(row: torch.Tensor, attention: torch.Tensor, grad: torch.Tensor | None, clamp: bool) -> torch.Tensor:
    """row [..., N] <- row + row · Ā, with Ā = mean_h((A ⊙ G)^+) (or mean_h A when grad is None).

    attention [H, N, N]; grad [..., H, N, N] (a leading token dimension when batched).
    """
    heads = attention.shape[-3]
    if grad is None:
        weighted = attention
    else:
        weighted = grad * attention  # out of place: the hook's grad keeps flowing to lower layers
        if clamp:
            weighted = weighted.clamp_(min=0)
    # Σ_i row_i · mean_h W[h, i, :] as one batched mat-vec per head (einsum would lower to mul + sum)
    weighted = weighted.to(row.dtype)
    if weighted.dim() == 3:  # shared map: row [N] or [T, N]
        update = torch.matmul(row, weighted).sum(0)
    else:  # per-token maps: row [T, N], weighted [T, H, N, N]
        update = torch.matmul(row[:, None, None, :], weighted)[:, :, 0].sum(1)
    update = update / heads
    return row + update


def _fold_row(row: torch.Tensor, attention: torch.Tensor, grad: torch.Tensor, clamp: bool, block: int = 128) -> torch.Tensor:
    """`_fold` for one token's row [N], touching only the rows of Ā where `row` is non-zero (one
    row at the top layer; never past the predicting position) in cache-sized blocks, and in each
    block only the columns a causal map can fill (keys up to the block's last query)."""
    heads = attention.shape[0]
    support = row.nonzero().squeeze(-1)
    if support.numel() == 0:
        return row
    update = torch.zeros_like(row)

    def add(rows: torch.Tensor | slice, end: int) -> None:
        weighted = grad[:, rows, :end] * attention[:, rows, :end]  # [H, b, end]
        if clamp:
            weighted.clamp_(min=0)
        update[:end].add_(torch.matmul(row[rows].to(weighted.dtype), weighted).sum(0).to(row.dtype))

    last = int(support.max()) + 1
    if support.numel() <= block:
        add(support, last)
    else:
        for start in range(0, last, block):
            stop = min(start + block, last)
            add(slice(start, stop), stop)
    return row + update / heads


def relevance(
    vlm: VLM,
    prompt: VisualPrompt,
    answer_ids: Sequence[int],
    head_reduce: str = "grad",
    clamp: bool = True,
    batch_tokens: int = 1,
    per_token: bool = False,
) -> torch.Tensor:
    """R_v [N_v]: mean over answer tokens of the relevance row at the visual positions (Eq. 1).
    With per_token=True the rows themselves, [T, N_v].

    head_reduce="grad" is the paper's gradient-weighted rule; "mean" is the Table-5 ablation
    (plain head mean of A, no gradients).  batch_tokens > 1 runs that many answer tokens' backward
    passes at once (`is_grads_batched`); 1 streams one backward per token through hooks.
    """
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, not {head_reduce!r}")
    if len(answer_ids) == 0:
        raise ValueError("relevance needs at least one answer token")
    logits, attentions, predicting = teacher_forced_attentions(vlm, prompt, answer_ids)
    num_layers, length = len(attentions), attentions[0].shape[-1]
    maps = [a[0].detach() for a in attentions]  # [H, N, N] each, shared by every answer token
    rows = torch.zeros(len(answer_ids), length, dtype=torch.float32, device=logits.device)
    rows[torch.arange(len(answer_ids)), predicting] = 1.0

    if head_reduce == "mean":
        for layer in reversed(range(num_layers)):
            rows = _fold(rows, maps[layer].float(), None, clamp)
    elif batch_tokens > 1:
        for start in range(0, len(answer_ids), batch_tokens):
            chunk = torch.arange(start, min(start + batch_tokens, len(answer_ids)), device=logits.device)
            selector = torch.eye(len(answer_ids), device=logits.device, dtype=logits.dtype)[chunk]
            grads = list(torch.autograd.grad(logits, attentions, grad_outputs=selector, retain_graph=True, is_grads_batched=True))
            block = rows[chunk]
            for layer in reversed(range(num_layers)):
                block = _fold(block, maps[layer], grads[layer][:, 0], clamp)
                grads[layer] = None  # free as soon as folded
            rows[chunk] = block
    else:
        current = {"row": None}

        def make_hook(layer: int):
            def hook(grad: torch.Tensor) -> None:
                current["row"] = _fold_row(current["row"], maps[layer], grad[0].detach(), clamp)

            return hook

        handles = [attentions[layer].register_hook(make_hook(layer)) for layer in range(num_layers)]
        try:
            for t in range(len(answer_ids)):
                current["row"] = rows[t]
                # differentiating to layer 0's map runs the backward through every layer, firing
                # each layer's hook once, top-down; the returned gradient itself is discarded
                torch.autograd.grad(logits[t], attentions[0], retain_graph=t < len(answer_ids) - 1)
                rows[t] = current["row"]
        finally:
            for handle in handles:
                handle.remove()
    per_token_rows = rows[:, prompt.visual_index.to(rows.device)].cpu()
    return per_token_rows if per_token else per_token_rows.mean(0)
