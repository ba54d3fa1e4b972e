"""VisionZip (Yang et al., 2024; official code dvlab-research/VisionZip, LLaVA / CLIP only).

Text-agnostic, before the LLM.  Of the k = round(r * N_v) visual tokens that enter the LLM:
  * dominant   (k - c): the tokens that receive the most attention in the vision tower;
  * contextual (c = round(k * contextual_share), default 10/64 — the README's 54 + 10 split):
    from the remaining tokens, c targets are taken by uniform stride (step = N_rest // c), every
    other remaining token is assigned to its most similar target (dot product of L2-normalised,
    head-averaged vision-tower keys), and each target becomes target + mean(assigned).

The vision encoders of Qwen2-VL and LLaVA-OV / VILA (SigLIP) have no [CLS] token, so the
"[CLS] -> patch attention" score is replaced by the substitute the Qwen2-VL ports use
(EffiVLM-Bench `qwen2vl_vision_tower_forward_visionzip`, LightCompress, Theia-4869/VisPruner issue #1): the mean
attention each patch *receives* (over heads and all query patches of its image / tile / frame) at
vision block `vision_layer` (default -2, as VisionZip and EffiVLM), pooled onto the LLM tokens the
way each family's projector pools the features (models/vision_attention.py; the adapters'
`vision_token_scores`).  The keys are pooled the same way.

The family-specific part is one adapter method, `vlm.vision_token_scores(prompt, layer) ->
(scores [N_v], keys [N_v, d])`, aligned with `prompt.visual_index`.  A score of +inf marks a visual
token that is not a vision patch (LLaVA-OV's newline tokens): it is ranked first, i.e. kept among
the dominant tokens, as VisionZip keeps [CLS] inside its dominant count.

Where the merge happens (deviation): the contextual merge is done on the LLM-input embeddings
(after the projector / merger), not on the vision-tower features before the projector as in the
LLaVA original; kept tokens (and each contextual token, at its target's slot) keep their original
positions (M-RoPE ids for Qwen2-VL), as LightCompress' Qwen2.5-VL port does.

Because the contextual tokens have new embeddings, VisionZip rewrites the prompt instead of
selecting inside the LLM: `generate(vlm, prompt, vz)` calls `vz.transform(vlm, prompt)`, which
returns the compressed `VisualPrompt`, and `plan` on it only records the kept tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from explain_prune.core import InputError
from explain_prune.engine.plan import PrunePlan
from explain_prune.methods.base import METHODS, Method, compressed_prompt
from explain_prune.models.base import VLM, VisualPrompt

META_KEY = "visionzip"


def vision_token_scores(vlm: VLM, prompt: VisualPrompt, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's (scores [N_v], keys [N_v, d]), checked, in at least float32 (float64 models keep
    their precision, so near-equal attention scores rank as the tower computed them)."""
    hook = getattr(vlm, "vision_token_scores", None)
    if not callable(hook):
        raise InputError(
            f"visionzip needs vision-tower attention: the {vlm.family!r} adapter has no vision_token_scores(prompt, layer)"
        )
    scores, keys = hook(prompt, layer)
    if scores.shape != (prompt.num_visual,) or keys.dim() != 2 or keys.shape[0] != prompt.num_visual:
        raise ValueError(f"vision_token_scores returned shapes {tuple(scores.shape)}, {tuple(keys.shape)} for {prompt.num_visual} visual tokens")
    if bool(scores.isnan().any()) or bool(scores.eq(-torch.inf).any()) or not bool(keys.isfinite().all()):
        raise ValueError("vision_token_scores returned NaN / -inf scores or non-finite keys")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return scores.to(dtype), keys.to(dtype)


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
    rest_mask = torch.ones(n, dtype=torch.bool, device=scores.device)
    rest_mask[dom] = False
    rest = rest_mask.nonzero().squeeze(-1)  # ascending
    new = embeds.clone()
    targets = rest[:0]
    if contextual > 0:
        step = max(1, rest.numel() // contextual)
        local_targets = torch.arange(0, rest.numel(), step, device=scores.device)[:contextual]
        targets = rest[local_targets]
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=scores.device)
        is_target[local_targets] = True
        others = rest[~is_target]
        if others.numel():
            metric = F.normalize(keys, dim=-1)
            assign = (metric[others] @ metric[targets].T).argmax(dim=1)  # [n_others] -> target slot
            one_hot = F.one_hot(assign, contextual).to(embeds.dtype)  # [n_others, c]
            counts = one_hot.sum(0).clamp(min=1)[:, None]
            merged = (one_hot.T @ embeds[others]) / counts
            new[targets] = embeds[targets] + merged
    kept = torch.cat([dom, targets]).sort().values
    return kept, new[kept], targets


@METHODS.register("visionzip")
class VisionZip(Method):
    defaults = {"contextual_share": 10 / 64, "vision_layer": -2, "count_rule": "round"}

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
        k = self.keep_count(prompt.num_visual)
        dominant, contextual = split_budget(k, self.options["contextual_share"])
        scores, keys = vision_token_scores(vlm, prompt, int(self.options["vision_layer"]))
        device = prompt.inputs_embeds.device
        visual = prompt.visual_index.to(device)
        kept, kept_embeds, targets = zip_tokens(
            scores.to(device), keys.to(device), prompt.inputs_embeds[0, visual].detach(), dominant, contextual
        )
        info = {"dominant": dominant, "contextual_targets": targets.cpu(), "scores": scores.cpu()}
        return compressed_prompt(prompt, kept, kept_embeds, META_KEY, info)

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        if META_KEY not in prompt.meta:
            raise InputError(
                "visionzip compresses the visual tokens before the LLM: run the engine on visionzip.transform(vlm, prompt)"
            )
        return PrunePlan(info={"method": self.name, "kept": {0: prompt.meta[META_KEY]["kept"]}})

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        return [self.keep_count(n_visual)] * int(num_layers)
