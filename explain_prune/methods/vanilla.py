"""The unpruned model: every visual token in every layer (the 100 % reference rows of Tables 2-4)."""

from __future__ import annotations

from typing import Any

from explain_prune.core import InputError
from explain_prune.engine.plan import PrunePlan
from explain_prune.methods.base import METHODS, Method
from explain_prune.models.base import VLM, VisualPrompt


@METHODS.register("vanilla")
class Vanilla(Method):
    defaults: dict[str, Any] = {}

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        if self.retention != 1.0:
            raise InputError(f"method 'vanilla' keeps every visual token; retention must be 1.0, got {retention}")

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        return PrunePlan(info={"method": self.name})

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        return [int(n_visual)] * int(num_layers)
