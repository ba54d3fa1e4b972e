"""PruneVid (Huang et al. 2024; official code Visual-AI/PruneVid @b12600c, PLLaVA only): merge
temporally static and spatially similar tokens before the LLM, then keep the tokens the question
attends to after layer K.

Stage 1 (`models/pllava/modeling_pllava.py`, `merge_frames_dynamic` L764-827, `cluster_dpc_knn`
L111-169, `refine_clusters` L213-314), on T frames of P tokens (LLM-input features):
* temporal segments: DPC-kNN (k = `temporal_k`) on the frames' mean tokens picks
  int(T `temporal_segment_ratio`) centres and gives each frame its nearest; `refine_clusters` keeps
  each cluster's longest runs, drops clusters that are only single frames, and relabels the rest
  after the longer neighbouring run (the left one on ties, cluster 0 with no neighbour); each run of
  equal labels is one segment of W frames;
* static tokens: the spatial positions whose mean pairwise cosine over the W frames exceeds `tau`
  (a one-frame segment has none: 0 / 0) are averaged over time into one token each;
* each group (a segment's static tokens; each frame's other tokens) of more than `merge_above`
  tokens is clustered by DPC-kNN (k = `spatial_k`) into int(n `cluster_ratio`) centres and
  replaced by the cluster means.
Stage 2 (`models/pllava/llama.py` L1417-1461 with `elastic_cache.py` VTPWindowCache L108-190): the
attention of layer K = `layer` (softmax of q k / sqrt(d) over all tokens, before RoPE and without
the causal mask), max over heads and over the text tokens after the video, ranks each group's
tokens; int(n alpha) per group survive.  The others leave the sequence from layer K + 1 on and the
KV caches of layers 0..K too (`PrunePlan.evict_earlier_caches`).  alpha is the method's `retention`
(official 0.4).

Deviations: the merged tokens enter the LLM at their cluster centre's original position (a static
token at its centre's place in the segment's first frame), in position order, as every method here
keeps positions (M-RoPE ids for Qwen2-VL); PLLaVA instead lays out each segment as static tokens
then frame by frame, in cluster-score order, and numbers the shortened sequence afresh.  The DPC
jitter is drawn from a generator seeded by (`seed`, sample id).  Layouts as FastVID's
(`methods.base.video_frames`); images are refused (no image rule).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from explain_prune.core import InputError, sample_seed
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.methods.base import METHODS, Method, compressed_prompt, tracked, video_frames
from explain_prune.methods.density_peaks import assign_to_centres, cluster_centres, peak_scores
from explain_prune.models.base import VLM, VisualPrompt

META_KEY = "prunevid"


def runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """(start, end inclusive, label) of each run of equal labels."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append((start, i - 1, labels[start]))
            start = i
    return out


def refine_clusters(labels: list[int]) -> list[int]:
    """Temporal cluster labels -> contiguous ones (the reference's `refine_clusters`, see module doc)."""
    refined = list(labels)
    by_label: dict[int, list[tuple[int, int]]] = {}
    for start, end, label in runs(labels):
        by_label.setdefault(label, []).append((start, end))
    for label, spans in by_label.items():
        longest = max(end - start + 1 for start, end in spans)
        for start, end in spans:
            if longest == 1 or end - start + 1 != longest:
                refined[start : end + 1] = [-1] * (end - start + 1)
    i, n = 0, len(refined)
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < n and refined[i] == -1:
            i += 1
        end = i - 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left, j = refined[start - 1], start - 1
            while j >= 0 and refined[j] == left:
                j -= 1
            left_len = start - j - 1
        if end < n - 1:
            right, j = refined[end + 1], end + 1
            while j < n and refined[j] == right:
                j += 1
            right_len = j - end - 1
        if left_len > right_len:
            label = left
        elif right_len > left_len:
            label = right
        else:
            label = left if left is not None else right
        refined[start : end + 1] = [0 if label is None else label] * (end - start + 1)
    return refined


def cluster_means(x: torch.Tensor, count: int, k: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN on x [n, D] -> (cluster means [count, D], centre indices [count]), highest score first."""
    score, dist = peak_scores(x[None], k, noise, generator)
    centres = cluster_centres(score, count)  # [1, count]
    labels = assign_to_centres(dist, centres)[0]  # [n]
    one_hot = F.one_hot(labels, count).to(x.dtype)  # [n, count]
    return (one_hot.T @ x) / one_hot.sum(0)[:, None], centres[0]


@METHODS.register("prunevid")
class PruneVid(Method):
    defaults = {"temporal_segment_ratio": 0.25, "temporal_k": 7, "tau": 0.8, "cluster_ratio": 0.5,
                "merge_above": 14, "spatial_k": 7, "layer": 10, "density_noise": 1e-6, "seed": 0,
                "expected_stage1_ratio": 0.5}
    modalities = ("video",)

    def __init__(self, retention: float = 0.4, **options: Any):
        super().__init__(retention, **options)
        o = self.options
        for key in ("temporal_segment_ratio", "cluster_ratio", "expected_stage1_ratio"):
            if not 0.0 < float(o[key]) <= 1.0:
                raise InputError(f"prunevid: {key} must be in (0, 1], got {o[key]!r}")
        if not -1.0 <= float(o["tau"]) <= 1.0:
            raise InputError(f"prunevid: tau must be in [-1, 1], got {o['tau']!r}")
        for key in ("temporal_k", "spatial_k"):
            if int(o[key]) < 1:
                raise InputError(f"prunevid: {key} must be >= 1, got {o[key]!r}")
        if int(o["merge_above"]) < 0 or int(o["layer"]) < 0 or float(o["density_noise"]) < 0:
            raise InputError("prunevid: merge_above, layer and density_noise must be >= 0")

    # --- stage 1: before the LLM -----------------------------------------------------------------
    def segments(self, frame_means: torch.Tensor, generator: torch.Generator) -> list[int]:
        """Segment lengths of the T frames (frame_means [T, D])."""
        o = self.options
        t = frame_means.shape[0]
        count = max(1, int(t * float(o["temporal_segment_ratio"])))
        score, dist = peak_scores(frame_means[None], int(o["temporal_k"]), float(o["density_noise"]), generator)
        labels = assign_to_centres(dist, cluster_centres(score, count))[0].tolist()
        return [end - start + 1 for start, end, _ in runs(refine_clusters(labels))]

    def merge_group(self, x: torch.Tensor, slots: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One group's tokens x [n, D] at ordinals `slots` [n] -> (tokens, their slots) after the
        spatial merge (only when n > merge_above)."""
        o = self.options
        if x.shape[0] <= int(o["merge_above"]):
            return x, slots
        count = max(1, int(x.shape[0] * float(o["cluster_ratio"])))  # the reference's n > 14 always gives >= 7
        means, centres = cluster_means(x, count, int(o["spatial_k"]), float(o["density_noise"]), generator)
        return means, slots[centres.cpu()]

    def transform(self, vlm: VLM, prompt: VisualPrompt) -> VisualPrompt:
        """Stage 1: the prompt with the merged tokens; `meta["prunevid"]["groups"]` labels each kept
        visual token with its stage-2 group (-1: a token outside the frames, always kept)."""
        frames, extra = video_frames(prompt, self.name)  # [T, P], [E]
        device = prompt.inputs_embeds.device
        embeds = prompt.inputs_embeds[0, prompt.visual_index.to(device)].detach()
        x = embeds[frames.to(device)]  # [T, P, D]
        generator = torch.Generator(device="cpu").manual_seed(sample_seed(int(self.options["seed"]), prompt.sample_id))
        sizes = self.segments(x.mean(1), generator)
        tokens, slots, groups = [embeds[extra.to(device)]], [extra], [torch.full((extra.numel(),), -1, device="cpu")]
        start, group = 0, 0
        for size in sizes:
            window = x[start : start + size]  # [W, P, D]
            unit = F.normalize(window.to(torch.promote_types(window.dtype, torch.float32)), dim=-1)
            pair_cos = torch.einsum("wld,tld->l", unit, unit)  # sum over all (w, t) pairs, self included
            static = (pair_cos - size) / (size * (size - 1)) > float(self.options["tau"])  # one frame: NaN -> False
            parts = [(window[:, static].mean(0), frames[start, static.cpu()])]
            parts += [(window[w, ~static], frames[start + w, (~static).cpu()]) for w in range(size)]
            for feats, where in parts:
                if where.numel() == 0:
                    continue
                merged, at = self.merge_group(feats, where, generator)
                tokens.append(merged)
                slots.append(at)
                groups.append(torch.full((at.numel(),), group, device="cpu"))
                group += 1
            start += size
        kept, order = torch.cat(slots).sort()
        info = {"segments": sizes, "groups": torch.cat(groups)[order], "num_groups": group}
        return compressed_prompt(prompt, kept, torch.cat(tokens)[order.to(device)], META_KEY, info)

    # --- stage 2: after layer K ------------------------------------------------------------------
    def text_attention(self, view: TokenView, layer: int) -> torch.Tensor:
        """[n_v] max over heads and over the text after the video of layer `layer`'s attention
        (before RoPE, over all tokens: no causal mask), for the live visual tokens."""
        after = torch.arange(int(view.visual_index.max()) + 1, view.length, device=view.hidden.device)
        queries, keys = view.projections(after, layer, rope=False)
        keys = keys.repeat_interleave(queries.shape[0] // keys.shape[0], dim=0)
        weights = (queries.float() @ keys.float().transpose(-1, -2) * view.decoder.layers[layer].self_attn.scaling).softmax(-1)  # [H, Q, n]
        return weights[..., view.visual_index].amax(dim=(0, 1))

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        if META_KEY not in prompt.meta:
            raise InputError("prunevid merges the visual tokens before the LLM: run the engine on prunevid.transform(vlm, prompt)")
        layer = self.scoring_layer(vlm.decoder.num_layers)
        groups = prompt.meta[META_KEY]["groups"]
        kept = prompt.meta[META_KEY]["kept"]
        # "alive": the stage-2 selector's record maps back to ordinals of the original visual tokens
        plan = PrunePlan(evict_earlier_caches=True, info={"method": self.name, "kept": {0: kept}, "alive": kept.clone()})

        def select(view: TokenView) -> tuple[torch.Tensor, torch.Tensor]:
            scores = self.text_attention(view, layer).cpu()
            keep = groups < 0
            for g in range(int(prompt.meta[META_KEY]["num_groups"])):
                members = (groups == g).nonzero().flatten()
                top = torch.argsort(-scores[members], stable=True)[: self.keep_count_of(members.numel())]
                keep[members[top]] = True
            return view.visual_index[keep.to(view.visual_index.device)], scores

        plan.selectors[layer + 1] = tracked(plan, layer + 1, select)
        return plan

    def scoring_layer(self, num_layers: int) -> int:
        """K, checked: layer K + 1 (the first without the dropped tokens) must exist."""
        layer = int(self.options["layer"])
        if not 0 <= layer <= num_layers - 2:
            raise InputError(f"prunevid: layer={layer} must be in 0..{num_layers - 2} on a {num_layers}-layer model (layer K + 1 runs pruned)")
        return layer

    def kv_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        """Stage 2 evicts the dropped tokens from layers 0..K too: every cache holds int(M1 alpha)."""
        return [self.visual_tokens_per_layer(n_visual, num_layers)[-1]] * int(num_layers)

    def keep_count_of(self, n: int) -> int:
        """int(n alpha): the reference keeps none of a group too small for one (unlike keep_count's floor of 1)."""
        return int(n * self.retention)

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        """Stage 1 is data-dependent (the engine records the real counts); the analytic schedule takes
        M1 = int(N `expected_stage1_ratio`) in layers 0..K and int(M1 alpha) after."""
        layer = self.scoring_layer(int(num_layers))
        merged = int(n_visual * float(self.options["expected_stage1_ratio"]))
        return [merged] * (layer + 1) + [self.keep_count_of(merged)] * (int(num_layers) - layer - 1)
