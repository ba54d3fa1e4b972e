"""Relevance of each visual token to the model's answer (the paper's Eq. 1, Chefer's rule).

For answer token t, predicted at position q_t, Eq. 1 builds R_t = (I + Ā_{L-1}) ... (I + Ā_0) with
Ā_l = mean_heads((A_l ⊙ ∂logit_t/∂A_l)^+), and reads the row e_{q_t}^T R_t at the visual positions.
Only that row is needed, so it is propagated as a row vector from the top layer down,
v <- v + v Ā_l, at O(N^2) per layer — never an N x N product.

Memory does not grow with depth or with the number of heads (docs/design.md, Relevance):

1. one no-grad forward (the model's own sdpa kernel) keeps only each layer's input hidden states;
2. top-down, each layer is run again from its saved input with `RecomputedAttention`, whose forward
   keeps q, k, v and the output — no N x N map — and whose backward, fed the answer tokens'
   cotangents from the layer above, recomputes the map a few heads at a time, folds
   (A ⊙ ∂logit/∂A)^+ into the relevance rows and returns the gradients of q, k and v;
3. the layer's input gradient is the cotangent handed to the layer below.

At most `head_block` heads' N x N maps (and their gradients) are alive at once.  The recomputed
layer is HF's own decoder layer; only its attention kernel is swapped, through transformers'
`AttentionInterface` (the attention function is selected by name, nothing is patched).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Sequence

import torch
from transformers import AttentionInterface

from explain_prune.explain.attention import A0_QUERIES
from explain_prune.models.base import VLM, VisualPrompt

HEAD_REDUCTIONS = ("grad", "mean")
RELEVANCE_ATTENTION = "explain_prune_relevance"  # the attention kernel name the recomputed layers run with


@dataclass
class RelevanceSettings:
    """conf/relevance/*.yaml.  All but the execution settings (`cached=False`: how the work is batched,
    not what it computes) determine a cached R_v and are part of the cache's config hash."""

    head_reduce: str = field(default="grad", metadata={"choices": HEAD_REDUCTIONS})
    clamp: bool = True
    include_eos: bool = False  # count the end-of-turn token as an answer token
    max_new_tokens: int = field(default=32, metadata={"minimum": 1})
    batch_tokens: int = field(default=1, metadata={"minimum": 1, "cached": False})  # answer tokens per backward pass
    head_block: int = field(default=4, metadata={"minimum": 1, "cached": False})  # heads whose N x N maps are alive at once
    a0_query: str = field(default="instruction", metadata={"choices": A0_QUERIES})  # instruction (paper) | last (ablation)


def cached_settings(settings: RelevanceSettings) -> dict:
    """The settings a cached R_v depends on (what the cache's config hash covers)."""
    return {f.name: getattr(settings, f.name) for f in fields(settings) if f.metadata.get("cached", True)}


@dataclass
class LayerFold:
    """What one recomputed layer folds its attention into: v <- v + v · mean_h W_h for the rows of
    the answer tokens in flight, W_h = (A_h ⊙ ∂logit/∂A_h)^+ (or A_h itself for head_reduce="mean")."""

    rows: torch.Tensor  # [B, N] float32: the relevance rows entering this layer from above
    clamp: bool
    head_block: int
    update: torch.Tensor | None = None  # [B, N] float32: Σ_h v · W_h, head block by head block

    def add(self, attention: torch.Tensor, grad: torch.Tensor | None) -> None:
        """attention [h, N, N]; grad [B, h, N, N] (row b's token), or None for the plain head mean."""
        weighted = attention[None] if grad is None else grad * attention[None]
        if grad is not None and self.clamp:
            weighted.clamp_(min=0)
        part = torch.matmul(self.rows[:, None, None, :], weighted)[:, :, 0].sum(1)  # [B, N]
        self.update = part if self.update is None else self.update + part

    def folded(self, num_heads: int) -> torch.Tensor:
        return self.rows if self.update is None else self.rows + self.update / num_heads


def attention_blocks(
    query: torch.Tensor, key: torch.Tensor, scaling: float, head_block: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Causal softmax maps of one sample, `head_block` query heads at a time.

    query [H, N, hd], key [KVH, N, hd] (post-RoPE) -> (heads, their kv heads [h], maps [h, N, N] float32),
    as HF's eager attention computes them (GQA: query head i reads kv head i // (H / KVH)).
    """
    heads, length = query.shape[0], query.shape[1]
    groups = heads // key.shape[0]
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu_(1)
    for start in range(0, heads, head_block):
        block = slice(start, min(start + head_block, heads))
        kv = torch.arange(block.start, block.stop, device=query.device) // groups
        scores = torch.matmul(query[block].float(), key[kv].float().transpose(-1, -2)) * scaling
        yield block, kv, scores.masked_fill_(future, float("-inf")).softmax(dim=-1)


class RecomputedAttention(torch.autograd.Function):
    """softmax(q kᵀ · scaling, causal) v that keeps no N x N map: the backward recomputes each head
    block's map, folds it into `fold` with its gradient, and returns the gradients of q, k, v.

    q [B, H, N, hd], k / v [B, KVH, N, hd].  The B rows are one input repeated, one per answer token
    whose cotangent arrives in the backward (so the map is the same for all of them).
    """

    @staticmethod
    def forward(ctx, query, key, value, scaling: float, fold: LayerFold, with_grad: bool):
        out = torch.empty_like(query[:1])
        for heads, kv, attention in attention_blocks(query[0], key[0], scaling, fold.head_block):
            out[0, heads] = torch.matmul(attention, value[0, kv].float()).to(out.dtype)
            if not with_grad:
                fold.add(attention, None)
        ctx.save_for_backward(query[0], key[0], value[0], out[0])
        ctx.scaling, ctx.fold, ctx.batch = scaling, fold, query.shape[0]
        return out.expand(query.shape[0], *out.shape[1:]).clone()

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [B, H, N, hd]
        query, key, value, out = ctx.saved_tensors
        scaling, fold = ctx.scaling, ctx.fold
        grad_q = torch.zeros(grad_out.shape, dtype=torch.float32, device=grad_out.device)
        grad_k = torch.zeros((ctx.batch, *key.shape), dtype=torch.float32, device=grad_out.device)
        grad_v = torch.zeros_like(grad_k)
        for heads, kv, attention in attention_blocks(query, key, scaling, fold.head_block):
            d_out = grad_out[:, heads].float()  # [B, h, N, hd]
            d_attention = torch.matmul(d_out, value[kv].float().transpose(-1, -2))  # [B, h, N, N]
            fold.add(attention, d_attention)
            grad_v.index_add_(1, kv, torch.matmul(attention.transpose(-1, -2), d_out))
            row_dot = (d_out * out[heads].float()).sum(-1, keepdim=True)  # softmax backward: Σ_j dA·A per row
            d_scores = d_attention.sub_(row_dot).mul_(attention).mul_(scaling)  # in place: one map per block
            grad_q[:, heads] = torch.matmul(d_scores, key[kv].float())
            grad_k.index_add_(1, kv, torch.matmul(d_scores.transpose(-1, -2), query[heads].float()))
        dtype = query.dtype
        return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), None, None, None


def _recomputed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The AttentionInterface entry: the layer's post-RoPE q / k / v, the fold in `relevance_fold`."""
    fold: LayerFold = kwargs["relevance_fold"]
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    out = RecomputedAttention.apply(query, key, value, scale, fold, torch.is_grad_enabled())
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(RELEVANCE_ATTENTION, _recomputed_attention)


def layer_inputs(vlm: VLM, embeds: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One no-grad causal pass (the model's sdpa kernel): each layer's input [1, N, d] and the last output."""
    inputs = []
    hidden = embeds
    with torch.no_grad(), vlm.attention_implementation("sdpa"):
        for layer in vlm.decoder.layers:
            inputs.append(hidden)
            hidden = layer(hidden, attention_mask=None, position_embeddings=cos_sin)
    return inputs, hidden


def answer_cotangents(vlm: VLM, last_hidden: torch.Tensor, predicting: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """∂logit_t/∂h_L at the predicting positions: [T, d] (each logit depends on its own row only)."""
    decoder = vlm.decoder
    with torch.enable_grad():
        top = last_hidden[0, predicting].detach().requires_grad_(True)
        logits = decoder.lm_head(decoder.norm(top))
        picked = logits.gather(-1, answer[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, top)
    return grad


def relevance(
    vlm: VLM,
    prompt: VisualPrompt,
    answer_ids: Sequence[int],
    head_reduce: str = "grad",
    clamp: bool = True,
    batch_tokens: int = 1,
    per_token: bool = False,
    head_block: int = 4,
) -> torch.Tensor:
    """R_v [N_v]: mean over answer tokens of the relevance row at the visual positions (Eq. 1).
    With per_token=True the rows themselves, [T, N_v].

    head_reduce="grad" is the paper's gradient-weighted rule; "mean" is the Table-5 ablation
    (plain head mean of A, no gradients).  With batch_tokens=k each recomputed layer runs forward on
    k copies of its input and one backward for k answer tokens at once (1: one token at a time).
    """
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, not {head_reduce!r}")
    if len(answer_ids) == 0:
        raise ValueError("relevance needs at least one answer token")
    decoder = vlm.decoder
    device = prompt.inputs_embeds.device
    answer = torch.as_tensor(list(answer_ids), dtype=torch.long, device=device)
    tokens = int(answer.numel())
    fed = vlm.embed_text(answer[:-1].view(1, -1)).to(prompt.inputs_embeds.dtype)
    embeds = torch.cat([prompt.inputs_embeds, fed], dim=1).detach()  # [1, N, d]
    positions = torch.cat([prompt.position_ids, prompt.next_positions(tokens - 1).to(prompt.position_ids.device)], -1)
    cos_sin = decoder.rotary_emb(embeds, positions)
    length = embeds.shape[1]
    predicting = torch.arange(prompt.length - 1, prompt.length - 1 + tokens, device=device)
    inputs, last_hidden = layer_inputs(vlm, embeds, cos_sin)

    rows = torch.zeros(tokens, length, dtype=torch.float32, device=device)
    rows[torch.arange(tokens, device=device), predicting] = 1.0
    if head_reduce == "grad":
        cotangent = torch.zeros(tokens, length, embeds.shape[-1], dtype=embeds.dtype, device=device)
        cotangent[torch.arange(tokens, device=device), predicting] = answer_cotangents(vlm, last_hidden, predicting, answer)
    with vlm.attention_implementation(RELEVANCE_ATTENTION):
        for index in reversed(range(decoder.num_layers)):
            layer, hidden = decoder.layers[index], inputs.pop()
            if head_reduce == "mean":
                fold = LayerFold(rows, clamp, head_block)
                with torch.no_grad():
                    layer(hidden, attention_mask=None, position_embeddings=cos_sin, relevance_fold=fold)
                rows = fold.folded(decoder.num_heads)
                continue
            for start in range(0, tokens, batch_tokens):
                chunk = slice(start, min(start + batch_tokens, tokens))
                rows[chunk], cotangent[chunk] = _layer_backward(
                    layer, hidden, cos_sin, rows[chunk], cotangent[chunk], clamp, head_block, decoder.num_heads
                )
    per_token_rows = rows[:, prompt.visual_index.to(device)].cpu()
    return per_token_rows if per_token else per_token_rows.mean(0)


def _layer_backward(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    cotangent: torch.Tensor,
    clamp: bool,
    head_block: int,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recomputed layer for a chunk of B answer tokens, run on B copies of its input [1, N, d]:
    (folded rows [B, N], input cotangents [B, N, d])."""
    count = rows.shape[0]
    with torch.enable_grad():
        x = hidden.detach().expand(count, *hidden.shape[1:]).clone().requires_grad_(True)
        fold = LayerFold(rows, clamp, head_block)
        out = layer(x, attention_mask=None, position_embeddings=cos_sin, relevance_fold=fold)
        (grad,) = torch.autograd.grad(out, x, grad_outputs=cotangent)
    return fold.folded(num_heads), grad
