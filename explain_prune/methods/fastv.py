"""FastV (Chen et al., ECCV 2024; official code pkunlp-icler/FastV).

At layer K (0-based; the default K=2 keeps layers 0 and 1 whole), rank the visual tokens by the
head-averaged attention they received in the map layer K-1 actually computed, and keep the top
k = round(r * N_v) from layer K on.  The map row is recomputed here from layer K-1's own q/k on the
hidden states entering it, so the model runs with sdpa everywhere (no eager layer needed).

query = "last": the last prompt token's row, as the official code does (`[0][-1]`, pkunlp-icler/FastV issue #14).
query = "mean": the mean over all query rows, EffiVLM-Bench's default port (`origin=False`).
Positions keep their original (gapped) values, as in the official code.
"""

from __future__ import annotations

from typing import Any

import torch

from explain_prune.core import InputError
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.methods.base import METHODS, Method, tracked
from explain_prune.models.base import VLM, VisualPrompt

QUERIES = ("last", "mean")


@METHODS.register("fastv")
class FastV(Method):
    defaults = {"layer": 2, "query": "last", "count_rule": "round"}
    choices = {**Method.choices, "query": QUERIES}

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        self.layer = int(self.options["layer"])
        if self.layer < 1:
            raise InputError(f"fastv: layer must be >= 1 (it ranks with layer K-1's attention), got {self.layer}")

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        k_layer = self._check_layer(self.layer, vlm.decoder.num_layers, "fastv layer", minimum=1)
        plan = PrunePlan(info={"method": self.name})

        def select(view: TokenView):
            if self.options["query"] == "last":
                rows = view.attention(torch.tensor([view.last_index], device=view.hidden.device), layer=k_layer - 1)  # [H, 1, n]
                scores = rows.mean(0)[0, view.visual_index]
            else:
                rows = view.attention(torch.arange(view.length, device=view.hidden.device), layer=k_layer - 1)  # [H, n, n]
                scores = rows.mean(0)[:, view.visual_index].mean(0)
            return view.keep_top(scores, self.budget(view)), scores

        plan.selectors[k_layer] = tracked(plan, k_layer, select)
        return plan

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        k_layer = self._check_layer(self.layer, num_layers, "fastv layer", minimum=1)
        return [int(n_visual)] * k_layer + [self.keep_count(n_visual)] * (int(num_layers) - k_layer)
