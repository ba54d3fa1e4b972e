"""DART (Wen et al., 2025: "Stop looking for important tokens ... duplication matters more").

Official code: ZichenWen1/DART; read through its vendored Qwen2-VL copy in Chenfei-Liao/VTC-Bench
(external/DART/Qwen2-VL/.../modeling_qwen2_vl_self.py, `get_retained_image_token`) and
LightCompress `llmc/compression/token_reduction/dart.py`.  At 0-based layer K (default 2), on the
outputs of layer K-1 (= the hidden states entering K):

1. pivots by the L1 norm of layer K-1's post-RoPE key states (heads concatenated): the top
   `pivot_image` visual tokens, and the top `pivot_text` tokens *after* the visual span
   (question + template tokens);
2. h = decoder.norm(hidden) — the LLM's final RMSNorm applied to the intermediate states, as the
   original does;
3. TOKEN_TOPK = int(N_v * (1 - reduction) / (pivot_image + pivot_text)); for each pivot in turn the
   TOKEN_TOPK candidates least cosine-similar to it are kept and leave the candidate pool (greedy, no
   double count); candidates are the visual tokens that are not image pivots;
4. kept = image pivots + everything selected; the text pivots only guide the selection (text
   tokens are never dropped).

Budget: the kept count is pivot_image + (pivot_image + pivot_text) * TOKEN_TOPK (capped at N_v),
which differs from round(r * N_v) by at most pivot_image tokens: up to +pivot_image when
r * N_v is a multiple of the pivot count, and up to pivot_text - 1 fewer otherwise (documented
budget excess; `expected_keep` states it exactly and the tests assert it).

The official rule is the default (xqy1111111/DART @d6a5af6, Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py
`get_retained_image_token`):
  * `pivot_order: official` visits the pivots in the order the official loop does: the iteration order
    of the Python set built from the image pivots (descending key norm) followed by the text pivots,
    as absolute sequence positions.  CPython hashes an int to itself, so this order is deterministic;
    it is not sorted.  `sorted` visits them in ascending position order (the project's earlier rule).
  * `topk_from: reduction` computes TOKEN_TOPK from the reduction ratio the official config holds,
    reduction = 1 - r written as a decimal, so the kept fraction is the float 1 - reduction
    (1 - 0.9 = 0.09999999999999998: N_v = 80 at r = 0.1 gives TOKEN_TOPK 0, where r itself gives 1).
    `retention` uses int(N_v * r / 8).
Remaining differences, none of which changes a kept set on untied scores: key L1 norms are taken
over the kv heads without `repeat_kv` (repeating multiplies every norm by the group size); ties in
the cosine ranking go to the earlier token (the official pool is a set, in its iteration order);
fewer than pivot_text tokens after the span use all of them, and TOKEN_TOPK above the pool size
takes the whole pool (the official `topk` raises).  Positions keep their original (gapped) values,
as in the original.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from explain_prune.core import InputError
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.methods.base import METHODS, Method, tracked
from explain_prune.models.base import VLM, VisualPrompt


@METHODS.register("dart")
class DART(Method):
    defaults = {"layer": 2, "pivot_image": 4, "pivot_text": 4, "pivot_order": "official", "topk_from": "reduction"}
    choices = {"pivot_order": ("official", "sorted"), "topk_from": ("reduction", "retention")}

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        self.layer = int(self.options["layer"])
        self.pivot_image = int(self.options["pivot_image"])
        self.pivot_text = int(self.options["pivot_text"])
        if self.layer < 1:
            raise InputError(f"dart: layer must be >= 1 (it reads layer K-1's keys), got {self.layer}")
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise InputError(f"dart: need pivot_image >= 1 and pivot_text >= 0, got {self.pivot_image}, {self.pivot_text}")

    def token_topk(self, n_visual: int) -> int:
        """Picks per pivot: int(N_v * kept fraction / pivots), the fraction as `topk_from` says."""
        fraction = self.retention
        if self.options["topk_from"] == "reduction":
            reduction = round(1.0 - self.retention, 10)  # the decimal an official config would hold
            fraction = 1.0 - reduction
        return int(n_visual * fraction / (self.pivot_image + self.pivot_text))

    def pivot_order(self, image_pivots: torch.Tensor, text_pivots: torch.Tensor) -> list[int]:
        """Sequence positions of the pivots, in the order the greedy selection visits them."""
        positions = image_pivots.tolist() + text_pivots.tolist()  # image pivots by descending key norm, then text
        if self.options["pivot_order"] == "official":
            return list(set(positions))  # CPython's set order over ints, as the official loop iterates
        return sorted(positions)

    def expected_keep(self, n_visual: int, n_text_after: int | None = None) -> int:
        """Visual tokens DART keeps for N_v = n_visual (n_text_after: tokens after the visual span,
        None = at least pivot_text)."""
        n_visual = int(n_visual)
        image_pivots = min(self.pivot_image, n_visual)
        text_pivots = self.pivot_text if n_text_after is None else min(self.pivot_text, int(n_text_after))
        picks = (image_pivots + text_pivots) * self.token_topk(n_visual)
        return image_pivots + min(picks, n_visual - image_pivots)

    def select(self, view: TokenView, key_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        visual = view.visual_index
        keys = view.keys(layer=key_layer)  # [KVH, n, hd], layer K-1 on the hidden states entering it
        norms = keys.float().abs().sum(dim=(0, 2))  # L1 norm of each token's concatenated key vector
        after = torch.arange(int(visual.max()) + 1, view.length, device=visual.device)

        order = torch.argsort(-norms[visual], stable=True)
        image_pivots = visual[order[: min(self.pivot_image, visual.numel())]]
        text_order = torch.argsort(-norms[after], stable=True)
        text_pivots = after[text_order[: min(self.pivot_text, after.numel())]]

        states = view.decoder.norm(view.hidden).float()
        topk = self.token_topk(visual.numel())
        kept = [image_pivots]
        pool = visual[~torch.isin(visual, image_pivots)]
        for pivot in self.pivot_order(image_pivots, text_pivots):
            if topk == 0 or pool.numel() == 0:
                break
            similarity = F.cosine_similarity(states[pivot][None], states[pool], dim=-1)
            chosen = torch.argsort(similarity, stable=True)[: min(topk, pool.numel())]  # least similar first
            kept.append(pool[chosen])
            remaining = torch.ones(pool.numel(), dtype=torch.bool, device=pool.device)
            remaining[chosen] = False
            pool = pool[remaining]
        kept_positions = torch.cat(kept).sort().values
        return kept_positions, norms[visual]

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        k_layer = self._check_layer(self.layer, vlm.decoder.num_layers, "dart layer", minimum=1)
        plan = PrunePlan(info={"method": self.name})
        plan.selectors[k_layer] = tracked(plan, k_layer, lambda view: self.select(view, k_layer - 1))
        return plan

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        k_layer = self._check_layer(self.layer, num_layers, "dart layer", minimum=1)
        return [int(n_visual)] * k_layer + [self.expected_keep(n_visual)] * (int(num_layers) - k_layer)
