"""Random input-stage pruning: keep k = round(r * N_v) visual tokens drawn uniformly, before layer 0.

The draw is seeded by (seed, sample id) through a stable hash, so a sample keeps the same tokens in
every run, process and batch composition.
"""

from __future__ import annotations

import torch

from explain_prune.core import sample_seed
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.methods.base import METHODS, Method, tracked
from explain_prune.models.base import VLM, VisualPrompt


@METHODS.register("random")
class RandomKeep(Method):
    defaults = {"seed": 0, "count_rule": "round"}

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        plan = PrunePlan(info={"method": self.name})
        seed = sample_seed(int(self.options["seed"]), prompt.sample_id)

        def select(view: TokenView) -> torch.Tensor:
            # on the host, so a sample keeps the same tokens on every device
            generator = torch.Generator(device="cpu").manual_seed(seed)
            order = torch.randperm(view.visual_index.numel(), generator=generator, device="cpu")
            chosen = order[: self.budget(view)].sort().values
            return view.visual_index[chosen.to(view.visual_index.device)]

        plan.selectors[0] = tracked(plan, 0, select)
        return plan

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        return [self.keep_count(n_visual)] * int(num_layers)
