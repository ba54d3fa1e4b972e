"""The paper's method (§3.3): a learned compressor f_θ maps the layer-0 attention A_v^0 to the
predicted relevance R̃_v, and the top k = round(r * N_v) visual tokens by R̃_v enter the LLM.

A_v^0 is `explain.first_layer_attention` — the instruction tokens' layer-0 attention rows (or the
last prompt position's, if f_θ was trained on that ablation: its file records `a0_query`), formed
from layer 0's own q/k only (so the model may run with sdpa / flash attention) —, exactly the
feature f_θ was trained on.  Both run inside the layer-0 selector, so the engine's prefill time
includes them.  The FLOPs overhead is Eq. 5 (A_v^0) + Eq. 6 (f_θ), reported separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from explain_prune.compress.network import FTheta, load_compressor
from explain_prune.core import InputError
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.explain import first_layer_attention
from explain_prune.engine.flops import (
    PAPER_COMPRESSOR_CHANNELS,
    compressor_flops,
    first_layer_attention_flops,
)
from explain_prune.methods.base import METHODS, Method, tracked
from explain_prune.models.base import VLM, VisualPrompt


@METHODS.register("ours")
class Ours(Method):
    defaults = {"checkpoint": None, "count_rule": "round"}

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        self.compressor: FTheta | None = None
        checkpoint = self.options["checkpoint"]
        if checkpoint not in (None, ""):
            path = Path(str(checkpoint))
            self.compressor = load_compressor(path)  # InputError if missing or not a compatible f_θ file

    def check_runnable(self) -> None:
        self._require_compressor()

    def _require_compressor(self) -> FTheta:
        if self.compressor is None:
            raise InputError("method 'ours' needs a trained f_θ: set method.options.checkpoint=<path.safetensors>")
        return self.compressor

    @torch.no_grad()
    def predict(self, vlm: VLM, prompt: VisualPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_v^0, R̃_v), both [N_v] float32 on the CPU."""
        net = self._require_compressor()
        a0 = first_layer_attention(vlm, prompt, net.config.a0_query).float()
        net = net.to(a0.device)
        rv = net(a0[None], torch.ones(1, a0.numel(), dtype=torch.bool, device=a0.device))[0]
        return a0, rv.float()

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        self._require_compressor()
        plan = PrunePlan(info={"method": self.name})

        def select(view: TokenView):
            # at layer 0 the view is the whole prompt, so A_v^0 is computed on exactly the features
            # f_θ was trained on; running it here puts its cost inside the timed prefill
            _, rv = self.predict(vlm, view.prompt)
            return view.keep_top(rv.to(view.hidden.device), self.budget(view)), rv

        plan.selectors[0] = tracked(plan, 0, select)
        return plan

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        return [self.keep_count(n_visual)] * int(num_layers)

    def overhead_flops(self, dims: Mapping[str, Any], n_visual: int) -> dict[str, float]:
        channels = self.compressor.config.channels if self.compressor is not None else PAPER_COMPRESSOR_CHANNELS
        kernel = self.compressor.config.kernel_size if self.compressor is not None else 3
        return {
            "first_layer_attention": first_layer_attention_flops(dims, n_visual),
            "compressor": compressor_flops(n_visual, channels=channels, kernel=kernel),
        }
