"""The decoding engine: `generate(vlm, prompt, method, max_new_tokens) -> Generation`."""

from __future__ import annotations

from typing import Any, Sequence

from explain_prune.engine.loop import Generation, KVCache, run
from explain_prune.engine.plan import PrunePlan, Selector, TokenView
from explain_prune.models.base import VLM, VisualPrompt


def _plan_for(method: Any, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
    if method is None:
        return PrunePlan()
    if isinstance(method, PrunePlan):
        return method
    return method.plan(vlm, prompt)


def generate(
    vlm: VLM,
    prompt: VisualPrompt | Sequence[VisualPrompt],
    method: Any = None,
    max_new_tokens: int = 32,
    mode: str = "remove",
    return_logits: bool = False,
) -> Generation | list[Generation]:
    """Greedy generation with the method's prune plan (None = vanilla).

    `method` is None, a `PrunePlan`, or a method object with `transform(vlm, prompt) -> prompt`
    and `plan(vlm, prompt) -> PrunePlan` (explain_prune.methods.Method).
    A list of prompts runs as one left-padded batch and returns a list.
    """
    prompts = [prompt] if isinstance(prompt, VisualPrompt) else list(prompt)
    if method is not None and not isinstance(method, PrunePlan):
        prompts = [method.transform(vlm, p) for p in prompts]
    plans = [_plan_for(method, vlm, p) for p in prompts]
    results = run(vlm, prompts, plans, max_new_tokens, mode=mode, return_logits=return_logits)
    return results[0] if isinstance(prompt, VisualPrompt) else results


__all__ = ["generate", "Generation", "KVCache", "PrunePlan", "Selector", "TokenView"]
