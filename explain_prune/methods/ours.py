"""The paper's method (§3.3): a learned compressor f_θ maps the layer-0 attention A_v^0 to the
predicted relevance R̃_v, and the top k = round(r * N_v) visual tokens by R̃_v enter the LLM.

A_v^0 is `explain.first_layer_attention` — the instruction tokens' layer-0 attention rows (or the
last prompt position's, if f_θ was trained on that ablation: its file records `a0_query`), formed
from layer 0's own q/k only (so the model may run with sdpa / flash attention) —, exactly the
feature f_θ was trained on.  A compressor variant that reads more layer-0 features (per-head A_v^0,
key/value norms: its `inputs`) gets them from `explain.first_layer_features`.  Both run inside the
layer-0 selector, so the engine's prefill time includes them.  The FLOPs overhead is Eq. 5 (A_v^0)
+ Eq. 6 (f_θ, its input channels included) + the value projection when the value norm is read,
reported separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from explain_prune.compress.network import Compressor, load_compressor, stack_inputs
from explain_prune.core import InputError
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.explain import first_layer_attention, first_layer_features
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
        self.compressor: Compressor | None = None
        checkpoint = self.options["checkpoint"]
        if checkpoint not in (None, ""):
            path = Path(str(checkpoint))
            self.compressor = load_compressor(path)  # InputError if missing or not a compatible f_θ file

    def check_runnable(self) -> None:
        self._require_compressor()

    def _require_compressor(self) -> Compressor:
        if self.compressor is None:
            raise InputError("method 'ours' needs a trained f_θ: set method.options.checkpoint=<path.safetensors>")
        return self.compressor

    @torch.no_grad()
    def predict(self, vlm: VLM, prompt: VisualPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_v^0, R̃_v), both [N_v] float32 on the CPU."""
        net = self._require_compressor()
        inputs = net.config.inputs
        if list(inputs) == ["a0"]:
            a0 = first_layer_attention(vlm, prompt, net.config.a0_query).float()
            x = a0[None]
        else:
            features = first_layer_features(vlm, prompt, net.config.a0_query)
            a0 = features.pop("a0").float()
            x = stack_inputs(a0, features, inputs).float()
            if x.shape[0] != net.config.in_channels:
                raise InputError(
                    f"method 'ours': the compressor reads {net.config.in_channels} input channels ({inputs}), "
                    f"this model gives {x.shape[0]}: it was trained on another model"
                )
        net = net.to(a0.device)
        rv = net(x[None], torch.ones(1, a0.numel(), dtype=torch.bool, device=a0.device))[0]
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
        """Eq. 5 + Eq. 6 (the paper's f_θ when no checkpoint is loaded), + the value projection of the
        visual tokens (n d d_kv) for a compressor reading kv_norm (the keys are Eq. 5's)."""
        net = self.compressor
        out = {
            "first_layer_attention": first_layer_attention_flops(dims, n_visual),
            "compressor": compressor_flops(n_visual, PAPER_COMPRESSOR_CHANNELS, 3) if net is None else net.flops(n_visual),
        }
        if net is not None and "kv_norm" in net.config.inputs:
            kv_width = int(dims["num_kv_heads"]) * int(dims["head_dim"])
            out["value_projection"] = float(int(n_visual) * int(dims["hidden_size"]) * kv_width)
        return out
