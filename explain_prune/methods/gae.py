"""The explainability oracle of Table 1: prune by the model's own relevance R_v to its answer.

For each sample: answer greedily with the unpruned engine, compute R_v = relevance(vlm, prompt,
answer) (Eq. 1, Chefer's gradient-weighted attention rule), and keep the top k = round(r * N_v)
visual tokens by R_v at the LLM input (layer 0).  It needs the answer before it can prune, so it is
an upper-bound reference, not a deployable method; its relevance pass is not part of the
prefill timing the engine reports.
"""

from __future__ import annotations

from typing import Any

import torch

from explain_prune.core import InputError
from explain_prune.engine import generate
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.explain import relevance
from explain_prune.explain.relevance import HEAD_REDUCTIONS
from explain_prune.methods.base import METHODS, Method, tracked
from explain_prune.models.base import VLM, VisualPrompt

@METHODS.register("gae")
class GAE(Method):
    defaults = {"max_new_tokens": 32, "head_reduce": "grad", "clamp": True, "count_rule": "round"}
    choices = {**Method.choices, "head_reduce": HEAD_REDUCTIONS}

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        if int(self.options["max_new_tokens"]) < 1:
            raise InputError(f"gae: max_new_tokens must be >= 1, got {self.options['max_new_tokens']}")

    def answer_ids(self, vlm: VLM, prompt: VisualPrompt) -> list[int]:
        """The unpruned greedy answer; an immediate end-of-answer counts as the answer token."""
        tokens = generate(vlm, prompt, None, max_new_tokens=int(self.options["max_new_tokens"])).tokens
        return tokens or [vlm.eos_token_ids[0]]

    def scores(self, vlm: VLM, prompt: VisualPrompt) -> tuple[torch.Tensor, list[int]]:
        answer = self.answer_ids(vlm, prompt)
        rv = relevance(vlm, prompt, answer, head_reduce=self.options["head_reduce"], clamp=bool(self.options["clamp"]))
        return rv.float(), answer

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        rv, answer = self.scores(vlm, prompt)
        plan = PrunePlan(info={"method": self.name, "answer_ids": answer})

        def select(view: TokenView):
            return view.keep_top(rv.to(view.hidden.device), self.budget(view)), rv

        plan.selectors[0] = tracked(plan, 0, select)
        return plan

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        return [self.keep_count(n_visual)] * int(num_layers)
