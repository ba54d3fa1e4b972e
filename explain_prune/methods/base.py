"""The contract every pruning method implements, and the bookkeeping they share.

A `Method` is built once per run from a retention ratio and its options (conf/method/<name>.yaml)
and asked for a `PrunePlan` per sample.  It also states its analytic visual-token schedule
(`visual_tokens_per_layer`), which the FLOPs / KV accounting uses and which must equal what the
engine records in `Generation.kept_per_layer` (tests/test_methods.py checks it).

Every selector a method registers goes through `tracked`, which records in `plan.info`:
  * "kept":   {layer: LongTensor of the kept visual tokens as ordinals 0..N_v-1 of the prompt's
               visual tokens} — which tokens survived, for tests and visualisation;
  * "scores": {layer: the scores the ranking used, aligned with the live visual tokens}.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import torch

from explain_prune.core import InputError
from explain_prune.core.registry import Registry
from explain_prune.core.retention import COUNT_RULES, check_retention, keep_count
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.models.base import VLM, VisualPrompt

SelectFn = Callable[[TokenView], "torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]"]


def compressed_prompt(prompt: VisualPrompt, kept: torch.Tensor, kept_embeds: torch.Tensor, meta_key: str,
                      info: dict[str, Any]) -> VisualPrompt:
    """The prompt with only the visual tokens `kept` (ordinals, ascending [k]), carrying `kept_embeds`
    ([k, d]: merged tokens differ from the originals) at their original positions (M-RoPE ids for
    Qwen2-VL).  Methods that rewrite the visual tokens before the LLM (VisionZip, FastVID, PruneVid)
    return it from `transform`; `info` lands in `meta[meta_key]` with the input count and `kept`."""
    if meta_key in prompt.meta:
        raise InputError(f"sample {prompt.sample_id!r} was already compressed by {meta_key}")
    kept = kept.cpu()
    device = prompt.inputs_embeds.device
    keep = torch.ones(prompt.length, dtype=torch.bool, device="cpu")  # over positions, like visual_index
    keep[prompt.visual_index] = False
    keep[prompt.visual_index[kept]] = True
    new_index = keep.long().cumsum(0) - 1  # old position -> new position (for kept ones)
    embeds = prompt.inputs_embeds[:, keep.to(device)].clone()
    new_visual = new_index[prompt.visual_index[kept]]
    embeds[0, new_visual.to(device)] = kept_embeds.to(device=device, dtype=embeds.dtype)
    return dataclasses.replace(
        prompt,
        inputs_embeds=embeds,
        position_ids=prompt.position_ids[..., keep.to(prompt.position_ids.device)],
        attention_mask=prompt.attention_mask[:, keep.to(prompt.attention_mask.device)],
        input_ids=prompt.input_ids[:, keep.to(prompt.input_ids.device)],
        visual_index=new_visual,
        instruction_index=new_index[prompt.instruction_index],
        meta={**prompt.meta, meta_key: {"num_visual_input": prompt.num_visual, "kept": kept, **info}},
    )


def video_frames(prompt: VisualPrompt, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames [T, h*w], extra [E]): the visual-token ordinals of each frame of a video prompt, and
    those outside the frame grid, which video methods keep as they are.

    One rule covers the families' layouts (`visual_grid` = (T, h, w), frames first, in order):
    Qwen2-VL's T temporal tokens (each 2 frames), LLaVA-OV's T pooled frames followed by one newline
    token (the extra), VILA's T per-frame token blocks (column-major inside a frame)."""
    if prompt.meta.get("modality") != "video":
        raise InputError(f"{method} prunes videos: sample {prompt.sample_id!r} is a {prompt.meta.get('modality', 'non-video')} prompt")
    t, h, w = prompt.visual_grid
    n = prompt.num_visual
    if t * h * w == 0 or t * h * w > n:
        raise InputError(f"{method}: sample {prompt.sample_id!r} has a visual grid {prompt.visual_grid} for {n} visual tokens")
    ordinals = torch.arange(n, device="cpu")  # host-side bookkeeping, like visual_index
    return ordinals[: t * h * w].view(t, h * w), ordinals[t * h * w :]


def tracked(plan: PrunePlan, layer: int, select: SelectFn) -> Callable[[TokenView], torch.Tensor]:
    """Wrap a selector so the plan records which original visual tokens it kept (see module doc).

    `select(view)` returns the kept view positions, or (positions, scores).  The plan of one sample
    is used by exactly one engine run, so the ordinals of the live visual tokens are tracked in
    `plan.info["alive"]` across stages (the engine keeps tokens in sequence order).
    """
    kept_info = plan.info.setdefault("kept", {})
    score_info = plan.info.setdefault("scores", {})

    def selector(view: TokenView) -> torch.Tensor:
        out = select(view)
        positions, scores = out if isinstance(out, tuple) else (out, None)
        positions = torch.as_tensor(positions, dtype=torch.long, device=view.visual_index.device).flatten()
        alive = plan.info.get("alive")
        if alive is None:
            alive = torch.arange(view.num_visual_input, dtype=torch.long, device=view.visual_index.device)
        if alive.numel() != view.visual_index.numel():
            raise RuntimeError(
                f"layer {layer}: the view has {view.visual_index.numel()} live visual tokens but the plan "
                f"tracked {alive.numel()} (was this plan reused across runs?)"
            )
        slots = torch.searchsorted(view.visual_index, positions)
        slots = slots.clamp(max=max(0, view.visual_index.numel() - 1))
        if positions.numel() and not bool((view.visual_index[slots] == positions).all()):
            raise RuntimeError(f"layer {layer}: a selector returned positions that are not live visual tokens")
        survivors = alive[slots.cpu()]
        plan.info["alive"] = survivors
        kept_info[layer] = survivors.clone()
        if scores is not None:
            score_info[layer] = scores.detach().float().cpu()
        return positions

    return selector


METHODS: Registry = Registry("method")  # every Method subclass registers itself: @METHODS.register(name)


class Method(abc.ABC):
    """A visual-token pruning method: retention ratio + options -> a `PrunePlan` per sample.

    Subclasses set `name`, `defaults` (every option they accept, with its default) and implement
    `plan` and `visual_tokens_per_layer`.  Unknown options are an InputError, so a typo in a
    config never silently falls back to a default.  A method that keeps a fraction of N_v declares
    `count_rule` in its defaults ("round" or "int", as its reference code counts; `core.retention`).
    """

    name: ClassVar[str] = "base"
    defaults: ClassVar[Mapping[str, Any]] = {}
    modalities: ClassVar[tuple[str, ...]] = ("image", "video")  # the inputs the method defines a rule for
    choices: ClassVar[Mapping[str, tuple]] = {"count_rule": COUNT_RULES}

    def __init__(self, retention: float = 1.0, **options: Any):
        self.retention = check_retention(retention)
        METHODS.check(self.name, options, "method.options")
        self.options: dict[str, Any] = {**self.defaults, **options}

    # --- what every method implements -------------------------------------------------------
    def check_runnable(self) -> None:
        """InputError when the method, as configured, cannot prune (evaluate asks before any model loads)."""

    def transform(self, vlm: VLM, prompt: VisualPrompt) -> VisualPrompt:
        """The prompt the engine runs; identity except for methods that rewrite the visual tokens
        before the LLM (VisionZip merges contextual tokens)."""
        return prompt

    @abc.abstractmethod
    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        """The per-sample prune plan (selectors keyed by layer)."""

    @abc.abstractmethod
    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        """Visual tokens each decoder layer processes for an input with n_visual visual tokens."""

    def kv_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        """Visual tokens each layer's KV cache holds after prefill: the tokens it processed, unless the
        method evicts them from earlier layers' caches too (PruneVid)."""
        return self.visual_tokens_per_layer(n_visual, num_layers)

    # --- shared ------------------------------------------------------------------------------
    @property
    def count_rule(self) -> str:
        return str(self.options.get("count_rule", "round"))

    def keep_count(self, n_visual: int, ratio: float | None = None) -> int:
        return keep_count(self.retention if ratio is None else ratio, n_visual, self.count_rule)

    def budget(self, view: TokenView, ratio: float | None = None) -> int:
        """The view's budget at `ratio` (default: the method's retention) under the method's count rule."""
        return view.budget(self.retention if ratio is None else ratio, self.count_rule)

    def overhead_flops(self, dims: Mapping[str, Any], n_visual: int) -> dict[str, float]:
        """Extra FLOPs the method spends outside the decoder layers (paper App. C counts only ours')."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What a results JSON records about the method."""
        return {"name": self.name, "retention": self.retention, "options": dict(self.options)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(retention={self.retention}{', ' + opts if opts else ''})"

    @staticmethod
    def _check_layer(layer: Any, num_layers: int, what: str, minimum: int = 0) -> int:
        try:
            value = int(layer)
        except (TypeError, ValueError):
            raise InputError(f"{what} must be an integer layer index, got {layer!r}") from None
        if not minimum <= value < num_layers:
            raise InputError(f"{what}={value} is outside {minimum}..{num_layers - 1} for a {num_layers}-layer model")
        return value
