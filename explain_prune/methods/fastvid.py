"""FastVID (Shen et al. 2025; official code LunarShen/FastVID @a40a109): dynamic density pruning of
video tokens before the LLM, at prefill.

The rule, from `fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`
L900-1075 (the LLaVA-OneVision port the paper's Table 10 row runs), on T frames of P tokens:

* DySeg: frame features g_t, cosine of neighbours s_t = cos(g_t, g_t+1); a segment ends after every
  frame t with s_t < `dyseg_tau` and after the `dyseg_c` - 1 least similar neighbours.
* STPrune budget per frame: R = int(P r) tokens, of which S = R - int(R `stprune_d`) salient and
  C = R - S context tokens.
* Salient: each frame's top S tokens by vision-tower attention.
* Context anchors: the other P - S tokens of a frame are ranked by DPC-kNN peak score (k = 4,
  methods/density_peaks.py).  A one-frame segment takes the frame's top C as merge targets.  In a
  segment of L > 1 frames, every `dtm_p`-th frame counted back from the segment's last is an anchor
  frame with (C L) // ceil(L / p) targets (at most its P - S tokens; the reference would fail there);
  the other frames keep only their salient tokens.
* DTM: each target gathers the non-salient tokens that are most cosine-similar to it among its own
  frame's (one-frame segment) or the whole segment's (anchor frame; every anchor frame gathers from
  all of them), and becomes w target + (1 - w) mean(gathered) with w = max(1 / (n + 1), `dtm_beta`),
  n the number gathered (the target itself among them).  A frame whose target count equals C merges
  over its own tokens even inside a longer segment, as the reference's one-frame branch selects frames
  by that count (only with p = 1 does an anchor frame get exactly C).
* Kept tokens keep their original positions (the reference sets position_ids to the kept indices).

The official code computes g_t and the attention with SigLIP's attention-pooling head, loaded from
the separate google/siglip-so400m-patch14-384 checkpoint (LLaVA-OV's tower ships without it:
`multimodal_encoder/siglip_encoder.py` L459-480, L622-655), bilinearly pooled like the frames.  On
every family here (deviation): g_t is the mean of the frame's LLM-input tokens, as the authors'
Qwen2.5-VL port does (`fastvid_qwen25vl/.../modeling_qwen2_5_vl.py` L1836), and the attention is the
vision tower's attention each token receives at block `vision_layer` (default -1, the last block, as
the Qwen2.5-VL port), the statistic VisionZip uses here (`vision_token_scores` of the adapter).

On the families' layouts (`methods.base.video_frames`): a frame is one Qwen2-VL temporal token (two
input frames), one LLaVA-OV pooled frame (its closing newline token is kept), one VILA frame.  Images
are refused: FastVID defines no image rule.  The DPC jitter (torch.rand * 1e-6 in the reference) is
drawn from a generator seeded by (`seed`, sample id).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from explain_prune.core import InputError, sample_seed
from explain_prune.engine.plan import PrunePlan
from explain_prune.methods.base import METHODS, Method, compressed_prompt, video_frames
from explain_prune.methods.density_peaks import cluster_centres, peak_scores
from explain_prune.methods.visionzip import vision_token_scores
from explain_prune.models.base import VLM, VisualPrompt

META_KEY = "fastvid"


def segment_sizes(similarity: torch.Tensor, count: int, tau: float) -> list[int]:
    """DySeg: segment lengths of T frames from the T - 1 neighbour similarities."""
    frames = similarity.numel() + 1
    cuts = set(torch.argsort(similarity, stable=True)[: max(0, min(count - 1, frames - 1))].tolist())
    cuts |= set((similarity < tau).nonzero().flatten().tolist())
    bounds = [-1, *sorted(cuts), frames - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def anchor_counts(sizes: list[int], context: int, stride: int) -> list[int]:
    """Merge targets per frame: C for a one-frame segment; (C L) // ceil(L / p) for every p-th frame
    counted back from the end of an L-frame segment, 0 for the others."""
    counts: list[int] = []
    for length in sizes:
        per_anchor = context * length // math.ceil(length / stride)
        counts += [per_anchor if (length - 1 - j) % stride == 0 else 0 for j in range(length)]
    return counts


def merge_into(targets: torch.Tensor, tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """DTM: targets [c, D] gather their most cosine-similar tokens [n, D] -> merged targets [c, D]."""
    similarity = F.normalize(tokens, dim=-1) @ F.normalize(targets, dim=-1).T  # [n, c]
    one_hot = F.one_hot(similarity.argmax(1), targets.shape[0]).to(tokens.dtype)  # [n, c]
    gathered = one_hot.sum(0)[:, None]  # [c, 1]
    weight = (1 / (gathered + 1)).clamp(min=beta)
    return weight * targets + (1 - weight) * (one_hot.T @ tokens) / gathered.clamp(min=1)


@METHODS.register("fastvid")
class FastVID(Method):
    defaults = {"dyseg_c": 8, "dyseg_tau": 0.9, "stprune_d": 0.4, "dtm_p": 4, "dtm_beta": 0.6,
                "density_k": 4, "density_noise": 1e-6, "vision_layer": -1, "seed": 0, "count_rule": "int"}
    modalities = ("video",)

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        o = self.options
        checks = {"dyseg_c": int(o["dyseg_c"]) >= 1, "dyseg_tau": -1.0 <= float(o["dyseg_tau"]) <= 1.0,
                  "stprune_d": 0.0 <= float(o["stprune_d"]) < 1.0, "dtm_p": int(o["dtm_p"]) >= 1,
                  "dtm_beta": 0.0 <= float(o["dtm_beta"]) <= 1.0, "density_k": int(o["density_k"]) >= 1,
                  "density_noise": float(o["density_noise"]) >= 0.0}
        ranges = {"dyseg_c": ">= 1", "dyseg_tau": "in [-1, 1]", "stprune_d": "in [0, 1)", "dtm_p": ">= 1",
                  "dtm_beta": "in [0, 1]", "density_k": ">= 1", "density_noise": ">= 0"}
        for key, ok in checks.items():
            if not ok:
                raise InputError(f"fastvid: {key} must be {ranges[key]}, got {o[key]!r}")

    def budget_split(self, frame_tokens: int) -> tuple[int, int]:
        """(S salient, C context) tokens per frame of `frame_tokens`: R = int(P r), C = int(R d)."""
        retained = self.keep_count(frame_tokens)
        context = int(retained * float(self.options["stprune_d"]))
        return retained - context, context

    def transform(self, vlm: VLM, prompt: VisualPrompt) -> VisualPrompt:
        """The prompt with FastVID's salient tokens and merged anchors (see module doc)."""
        o = self.options
        frames, extra = video_frames(prompt, self.name)  # [T, P], [E] ordinals
        num_frames, frame_tokens = frames.shape
        device = prompt.inputs_embeds.device
        embeds = prompt.inputs_embeds[0, prompt.visual_index.to(device)].detach()  # [N, D]
        x = embeds[frames.to(device)]  # [T, P, D]
        attention = vision_token_scores(vlm, prompt, int(o["vision_layer"]))[0].to(device)[frames.to(device)]  # [T, P]
        salient_n, context_n = self.budget_split(frame_tokens)
        g = F.normalize(x.mean(1).to(torch.promote_types(x.dtype, torch.float32)), dim=-1)  # [T, D] frame features
        sizes = segment_sizes((g[:-1] * g[1:]).sum(-1).cpu(), int(o["dyseg_c"]), float(o["dyseg_tau"]))
        targets_per_frame = anchor_counts(sizes, context_n, int(o["dtm_p"]))

        salient = torch.argsort(-attention.float(), dim=1, stable=True)[:, :salient_n]  # [T, S]
        rest = torch.ones(num_frames, frame_tokens, dtype=torch.bool, device=device)
        rest.scatter_(1, salient, False)
        rest_index = rest.nonzero()[:, 1].view(num_frames, frame_tokens - salient_n)  # [T, P - S] ascending
        rest_tokens = torch.gather(x, 1, rest_index[..., None].expand(-1, -1, x.shape[-1]))  # [T, P - S, D]
        generator = torch.Generator(device="cpu").manual_seed(sample_seed(int(o["seed"]), prompt.sample_id))
        score, _ = peak_scores(rest_tokens, int(o["density_k"]), float(o["density_noise"]), generator)  # [T, P - S]

        kept = [frames[t, salient[t].cpu()] for t in range(num_frames)] + [extra]
        kept_embeds = [x[t, salient[t]] for t in range(num_frames)] + [embeds[extra.to(device)]]
        beta, start = float(o["dtm_beta"]), 0
        for length in sizes:
            segment = range(start, start + length)
            pool = rest_tokens[start : start + length].flatten(0, 1)  # the segment's non-salient tokens
            for t in segment:
                count = min(targets_per_frame[t], frame_tokens - salient_n)
                if count == 0:
                    continue
                chosen = cluster_centres(score[t : t + 1], count)[0]  # [count] into rest_index[t]
                sources = rest_tokens[t] if targets_per_frame[t] == context_n else pool
                kept.append(frames[t, rest_index[t, chosen].cpu()])
                kept_embeds.append(merge_into(rest_tokens[t, chosen], sources, beta))
            start += length
        kept_t, order = torch.cat(kept).sort()
        merged = torch.cat(kept_embeds)[order.to(device)]
        info = {"segments": sizes, "salient_per_frame": salient_n, "context_per_frame": context_n,
                "targets_per_frame": targets_per_frame}
        return compressed_prompt(prompt, kept_t, merged, META_KEY, info)

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        if META_KEY not in prompt.meta:
            raise InputError("fastvid compresses the visual tokens before the LLM: run the engine on fastvid.transform(vlm, prompt)")
        return PrunePlan(info={"method": self.name, "kept": {0: prompt.meta[META_KEY]["kept"]}})

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        """int(N r) in every layer: the frames' budgets T int(P r) when P r is whole (the paper's 32 x 196
        frames at 25 %: 1568).  The real count depends on the segments (a multi-frame segment may keep
        a few fewer) and the layout (LLaVA-OV's newline is kept on top): the engine records it."""
        return [self.keep_count(n_visual)] * int(num_layers)
