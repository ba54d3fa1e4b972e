"""VisionZip (Yang et al., 2024; official code dvlab-research/VisionZip, LLaVA / CLIP only).

Text-agnostic, before the LLM.  Of the k = round(r * N_v) visual tokens that enter the LLM:
  * dominant   (k - c): the tokens that receive the most attention in the vision tower;
  * contextual (c = round(k * contextual_share), default 10/64 — the README's 54 + 10 split):
    from the remaining tokens, c targets are taken by uniform stride (step = N_rest // c), every
    other remaining token is assigned to its most similar target (dot product of L2-normalised,
    head-averaged vision-tower keys), and each target becomes target + mean(assigned).

The vision encoders of Qwen2-VL and LLaVA-OV / VILA (SigLIP) have no [CLS] token, so the
"[CLS] -> patch attention" score is replaced by the substitute the Qwen2-VL ports use
(EffiVLM-Bench `qwen2vl_vision_tower_forward_visionzip`, LightCompress, VisPruner #1): the mean
attention each patch *receives* (over heads and all query patches of its image / frame) at vision
layer `vision_layer` (default -2, as VisionZip and EffiVLM), averaged over the patches that merge
into one LLM token (Qwen2-VL's 2x2 PatchMerger).  The keys are pooled the same way.

Where the merge happens (deviation): the contextual merge is done on the LLM-input embeddings
(after the projector / merger), not on the vision-tower features before the projector as in the
LLaVA original; kept tokens (and each contextual token, at its target's slot) keep their original
positions (M-RoPE ids for Qwen2-VL), as LightCompress' Qwen2.5-VL port does.

Because the contextual tokens have new embeddings, VisionZip rewrites the prompt instead of
selecting inside the LLM: `transform(vlm, prompt)` returns the compressed `VisualPrompt`, and
`plan` on a transformed prompt is the empty plan (`generate(vlm, vz.transform(vlm, p), vz)`).

Vision-tower scores come from `vlm.vision_token_scores(prompt, layer)` when the adapter provides
it ((scores [N_v], keys [N_v, d]) aligned with prompt.visual_index); for the Qwen2-VL family it is
computed here from the vision tower and the prompt's pixels (`qwen2vl_vision_token_scores`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from explain_prune.engine.plan import PrunePlan
from explain_prune.methods.base import Method, keep_count
from explain_prune.models.base import InputError, VisualPrompt, VLM

META_KEY = "visionzip"


def qwen2vl_vision_probs(attn: torch.nn.Module, x: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings: Any):
    """Yield (start, end, head, probs [n, n]) of a Qwen2-VL VisionAttention on its input x
    (after norm1), one image / temporal patch chunk and one head at a time (memory n x n)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    seq = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [seq, H, hd]
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks = q[start:end].float().transpose(0, 1), k[start:end].float().transpose(0, 1)  # [H, n, hd]
        for h in range(qs.shape[0]):
            yield start, end, h, torch.softmax(qs[h] @ ks[h].T * attn.scaling, dim=-1)


def qwen2vl_capture_attention_input(vlm: VLM, prompt: VisualPrompt, layer: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Run the vision tower on the prompt's pixels; return vision block `layer`'s attention module
    and what it received (x after norm1, cu_seqlens, position_embeddings) and returned (out)."""
    meta = prompt.meta
    grid = meta.get("image_grid_thw", meta.get("video_grid_thw"))
    pixels = meta.get("pixel_values")
    if grid is None or pixels is None:
        raise InputError(f"sample {prompt.sample_id!r}: the prompt carries no pixel_values / grid for VisionZip")
    visual = vlm.model.model.visual
    blocks = visual.blocks
    if not -len(blocks) <= layer < len(blocks):
        raise InputError(f"visionzip: vision_layer {layer} outside a {len(blocks)}-block vision tower")
    attn = blocks[layer].attn
    captured: dict[str, Any] = {}

    def pre_hook(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["cu_seqlens"] = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        captured["position_embeddings"] = kwargs.get("position_embeddings")

    def post_hook(module, args, output):
        captured["out"] = output

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True), attn.register_forward_hook(post_hook)]
    try:
        with torch.no_grad():
            visual(pixels.to(device=vlm.device, dtype=visual.get_dtype()), grid_thw=grid.to(vlm.device))
    finally:
        for handle in handles:
            handle.remove()
    return attn, captured


@torch.no_grad()
def qwen2vl_vision_token_scores(vlm: VLM, prompt: VisualPrompt, layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean attention received [N_v], head-mean keys [N_v, head_dim]) at Qwen2-VL vision block
    `layer`, each averaged over the spatial_merge_size**2 patches of one LLM visual token."""
    attn, captured = qwen2vl_capture_attention_input(vlm, prompt, layer)
    x = captured["x"]
    seq = x.shape[0]
    raw_keys = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1)[:, 1].float().mean(1)  # pre-RoPE, head mean
    received = torch.zeros(seq, dtype=torch.float32, device=x.device)
    for start, end, _, probs in qwen2vl_vision_probs(attn, x, captured["cu_seqlens"], captured["position_embeddings"]):
        received[start:end] += probs.mean(0) / attn.num_heads
    group = vlm.model.model.visual.spatial_merge_size ** 2
    scores = received.view(-1, group).mean(1)
    keys = raw_keys.view(-1, group, raw_keys.shape[-1]).mean(1)
    if scores.numel() != prompt.num_visual:
        raise InputError(f"sample {prompt.sample_id!r}: {scores.numel()} vision groups for {prompt.num_visual} visual tokens")
    return scores.cpu(), keys.cpu()


FAMILY_SCORERS = {"qwen2vl": qwen2vl_vision_token_scores}


def vision_token_scores(vlm: VLM, prompt: VisualPrompt, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    hook = getattr(vlm, "vision_token_scores", None)
    if callable(hook):
        scores, keys = hook(prompt, layer)
    elif vlm.family in FAMILY_SCORERS:
        scores, keys = FAMILY_SCORERS[vlm.family](vlm, prompt, layer)
    else:
        raise InputError(
            f"visionzip needs vision-tower attention: the {vlm.family!r} adapter has no vision_token_scores(prompt, layer) "
            f"(available for: {', '.join(sorted(FAMILY_SCORERS))})"
        )
    if scores.shape != (prompt.num_visual,) or keys.dim() != 2 or keys.shape[0] != prompt.num_visual:
        raise ValueError(f"vision_token_scores returned shapes {tuple(scores.shape)}, {tuple(keys.shape)} for {prompt.num_visual} visual tokens")
    return scores.float(), keys.float()


def split_budget(k: int, contextual_share: float) -> tuple[int, int]:
    """(dominant, contextual) counts of a k-token budget; at least one dominant token."""
    contextual = min(max(0, round(k * contextual_share)), k - 1)
    return k - contextual, contextual


def zip_tokens(
    scores: torch.Tensor, keys: torch.Tensor, embeds: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip on one sample's visual tokens.

    scores [N], keys [N, d], embeds [N, D] -> (kept ordinals ascending [k], their embeddings [k, D]
    (contextual targets replaced by target + mean(assigned)), contextual target ordinals [c]).
    """
    n = scores.numel()
    order = torch.argsort(-scores, stable=True)
    dom = order[:dominant]
    rest_mask = torch.ones(n, dtype=torch.bool)
    rest_mask[dom] = False
    rest = rest_mask.nonzero().squeeze(-1)  # ascending
    new = embeds.clone()
    targets = rest[:0]
    if contextual > 0:
        step = max(1, rest.numel() // contextual)
        local_targets = torch.arange(0, rest.numel(), step)[:contextual]
        targets = rest[local_targets]
        is_target = torch.zeros(rest.numel(), dtype=torch.bool)
        is_target[local_targets] = True
        others = rest[~is_target]
        if others.numel():
            metric = F.normalize(keys.float(), dim=-1)
            assign = (metric[others] @ metric[targets].T).argmax(dim=1)  # [n_others] -> target slot
            one_hot = F.one_hot(assign, contextual).to(embeds.dtype)  # [n_others, c]
            counts = one_hot.sum(0).clamp(min=1)[:, None]
            merged = (one_hot.T @ embeds[others]) / counts
            new[targets] = embeds[targets] + merged
    kept = torch.cat([dom, targets]).sort().values
    return kept, new[kept], targets


class VisionZip(Method):
    name = "visionzip"
    defaults = {"contextual_share": 10 / 64, "vision_layer": -2}

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        share = float(self.options["contextual_share"])
        if not 0.0 <= share < 1.0:
            raise InputError(f"visionzip: contextual_share must be in [0, 1), got {share}")
        self.options["contextual_share"] = share

    def transform(self, vlm: VLM, prompt: VisualPrompt) -> VisualPrompt:
        """The prompt with only the k dominant + contextual visual tokens (see module doc)."""
        if META_KEY in prompt.meta:
            raise InputError(f"sample {prompt.sample_id!r} was already compressed by visionzip")
        n = prompt.num_visual
        k = keep_count(self.retention, n)
        dominant, contextual = split_budget(k, self.options["contextual_share"])
        scores, keys = vision_token_scores(vlm, prompt, int(self.options["vision_layer"]))
        visual = prompt.visual_index.to(prompt.inputs_embeds.device)
        kept, kept_embeds, targets = zip_tokens(
            scores, keys, prompt.inputs_embeds[0, visual].detach().cpu(), dominant, contextual
        )
        keep = torch.ones(prompt.length, dtype=torch.bool)
        keep[prompt.visual_index] = False
        keep[prompt.visual_index[kept]] = True
        new_index = keep.long().cumsum(0) - 1  # old position -> new position (for kept ones)
        device = prompt.inputs_embeds.device
        keep_dev = keep.to(device)
        embeds = prompt.inputs_embeds[:, keep_dev].clone()
        new_visual = new_index[prompt.visual_index[kept]]
        embeds[0, new_visual.to(device)] = kept_embeds.to(device=device, dtype=embeds.dtype)
        position_ids = prompt.position_ids[..., keep.to(prompt.position_ids.device)]
        return dataclasses.replace(
            prompt,
            inputs_embeds=embeds,
            position_ids=position_ids,
            attention_mask=prompt.attention_mask[:, keep.to(prompt.attention_mask.device)],
            input_ids=prompt.input_ids[:, keep.to(prompt.input_ids.device)],
            visual_index=new_visual,
            instruction_index=new_index[prompt.instruction_index],
            meta={
                **prompt.meta,
                META_KEY: {
                    "num_visual_input": n,
                    "kept": kept,
                    "dominant": dominant,
                    "contextual_targets": targets,
                    "scores": scores,
                },
            },
        )

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        if META_KEY not in prompt.meta:
            raise InputError(
                "visionzip compresses the visual tokens before the LLM: run the engine on visionzip.transform(vlm, prompt)"
            )
        return PrunePlan(info={"method": self.name, "kept": {0: prompt.meta[META_KEY]["kept"]}})

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        return [keep_count(self.retention, n_visual)] * int(num_layers)
