"""PyramidDrop (Xing et al., CVPR 2025; official code Cooperx521/PyramidDrop).

Multi-stage pruning: at each stage layer b_s (s = 1..S, ascending) the visual tokens still alive
are ranked by the attention the *last prompt token* pays them, recomputed with layer b_s's own
weights on the hidden states entering it (input norm -> q/k -> RoPE -> causal softmax, head mean),
and the top count(λ^s · N_v) are kept (N_v = visual tokens at the LLM input).

The official rule is the default (Cooperx521/PyramidDrop @6444f30, llava/model/modeling_llama_pdrop.py
L1306-1307 and L1262-1268; ratio list [λ, λ², λ³] with 1.0 prepended, llava/eval/model_vqa_loader.py L94-96):
  * `count_rule: int`: each stage keeps int(N_v · λ^s), counted from N_v, not from the previous stage;
  * `renumber_positions: auto`: positions are renumbered contiguously after every drop on 1-D RoPE
    models (LLaVA-OV, VILA), as the official code does; Qwen2-VL's M-RoPE has no such rule, so it
    keeps its original positions (`true` on Qwen2-VL is an InputError, `false` keeps them everywhere).

`retention` is the target *layer-averaged* retention r̄ (the "*" numbers of Tables 2/3/9):

    r̄ = (1/L) Σ_s (b_{s+1} - b_s) λ^s,   b_0 = 0, b_{S+1} = L.

Schedule (`schedule(num_layers)`), first match wins:
  * `layers` and `lam` given -> used as is; r̄ must be within TOLERANCE of the target.
  * `schedule: paper` and a PAPER_SCHEDULES entry for (retention, L) -> that entry: the official
    code's default [8, 16, 24] with λ = 0.5 for the paper's "51 %*" rows (r̄ = 51.8 % on 28 layers,
    0.51× FLOPs at App. C's inputs) and [2, 5, 11] with λ = 0.5 for its "25 %*" rows (0.25×, 18.1 MB
    KV on Qwen2-VL, 3.2 T on LLaVA-OV), the schedules that reproduce the paper's FLOPs.
  * otherwise the solver (`schedule: solved` always uses it):
    - `layers` null -> stage layers [K, b, 2b] with K = `first_layer` (2) and b = round((L - 8) / 4)
      ([2, 5, 10] for 28 layers, [2, 6, 12] for 32); stages at or beyond the last layer are dropped;
    - `lam` null -> λ is solved (bisection; r̄ is increasing in λ); targets below K/L are an
      InputError.  `lam` given with `layers` null -> the stage layers are searched: all ascending
      S-tuples (S = `num_stages`) starting at K, closest r̄ first, then the most "doubling" shape
      (Σ_{s>=2} |b_{s+1} - 2 b_s|), then the earliest layers.
`describe()` records the schedule each depth used and where it came from ("given", "paper", "solved",
"searched"), so results.json says which rule ran.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from explain_prune.core import InputError
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.methods.base import METHODS, Method, keep_count, tracked
from explain_prune.models.base import VLM, VisualPrompt

TOLERANCE = 0.02  # allowed |r̄ - target| for given or searched schedules (the paper files 51.8 % under 50 %)
SCHEDULE_SOURCES = ("paper", "solved")
# (retention, num_layers) -> (stage layers, λ): the paper's PDrop rows on its 28-layer LLMs (see module doc)
PAPER_SCHEDULES: dict[tuple[float, int], tuple[tuple[int, ...], float]] = {
    (0.51, 28): ((8, 16, 24), 0.5),
    (0.5, 28): ((8, 16, 24), 0.5),
    (0.25, 28): ((2, 5, 11), 0.5),
    (0.254, 28): ((2, 5, 11), 0.5),
}


def layer_averaged(layers: Sequence[int], lam: float, num_layers: int) -> float:
    """r̄ of a stage schedule with continuous ratios λ^s (no rounding)."""
    bounds = [0, *layers, num_layers]
    return sum((bounds[s + 1] - bounds[s]) * lam**s for s in range(len(bounds) - 1)) / num_layers


def solve_lambda(layers: Sequence[int], num_layers: int, target: float) -> float:
    """λ in (0, 1] with layer_averaged(layers, λ) == target (bisection; monotone in λ)."""
    low_bound = layer_averaged(layers, 0.0, num_layers)  # only the layers before the first stage
    if target <= low_bound + 1e-12:
        raise InputError(
            f"pdrop: a layer-averaged retention of {target:.4f} is unreachable with stage layers {list(layers)} on "
            f"{num_layers} layers (the layers before the first stage alone give {low_bound:.4f}); lower first_layer"
        )
    if target >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if layer_averaged(layers, mid, num_layers) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def default_layers(num_layers: int, first_layer: int) -> list[int]:
    """[K, b, 2b] with b = round((L - 8) / 4), keeping only stages after K and before the last layer."""
    b = round((num_layers - 8) / 4)
    return [first_layer] + sorted({x for x in (b, 2 * b) if first_layer < x < num_layers})


def search_layers(num_layers: int, lam: float, target: float, first_layer: int, num_stages: int) -> list[int]:
    """Stage layers (starting at first_layer) whose r̄ at fixed λ is closest to the target."""
    rest = range(first_layer + 1, num_layers)
    best: tuple | None = None
    for tail in itertools.combinations(rest, num_stages - 1):
        layers = [first_layer, *tail]
        shape = sum(abs(layers[s + 1] - 2 * layers[s]) for s in range(1, len(layers) - 1))
        key = (round(abs(layer_averaged(layers, lam, num_layers) - target), 9), shape, layers)
        if best is None or key < best:
            best = key
    if best is None:
        raise InputError(f"pdrop: {num_stages} stages starting at layer {first_layer} do not fit in {num_layers} layers")
    if best[0] > TOLERANCE:
        raise InputError(
            f"pdrop: no {num_stages}-stage schedule with λ={lam} reaches a layer-averaged retention of {target:.4f} "
            f"on {num_layers} layers (closest is off by {best[0]:.4f}); leave lam null to solve for it"
        )
    return list(best[2])


@dataclass(frozen=True)
class Schedule:
    layers: tuple[int, ...]
    lam: float
    num_layers: int
    count_rule: str = "int"
    source: str = "given"  # given | paper | solved | searched

    @property
    def ratios(self) -> tuple[float, ...]:
        """Kept fraction of N_v from each stage layer on."""
        return tuple(self.lam ** (s + 1) for s in range(len(self.layers)))

    @property
    def nominal_retention(self) -> float:
        return layer_averaged(self.layers, self.lam, self.num_layers)

    def counts(self, n_visual: int) -> list[int]:
        """Visual tokens processed by each layer (the engine's kept_per_layer)."""
        out, current = [], int(n_visual)
        stage = dict(zip(self.layers, self.ratios))
        for layer in range(self.num_layers):
            if layer in stage:
                current = min(current, keep_count(stage[layer], n_visual, self.count_rule))
            out.append(current)
        return out


@METHODS.register("pdrop")
class PDrop(Method):
    defaults = {"schedule": "paper", "layers": None, "lam": None, "first_layer": 2, "num_stages": 3,
                "count_rule": "int", "renumber_positions": "auto"}
    choices = {**Method.choices, "schedule": SCHEDULE_SOURCES, "renumber_positions": ("auto", True, False)}

    def __init__(self, retention: float = 1.0, **options: Any):
        super().__init__(retention, **options)
        layers, lam = self.options["layers"], self.options["lam"]
        if layers is not None:
            layers = [int(x) for x in layers]
            if not layers or any(b >= a for b, a in zip(layers, layers[1:])) or layers[0] < 1:
                raise InputError(f"pdrop: layers must be a non-empty strictly ascending list of layers >= 1, got {layers}")
            self.options["layers"] = layers
        if lam is not None and not 0.0 < float(lam) <= 1.0:
            raise InputError(f"pdrop: lam must be in (0, 1], got {lam}")
        if int(self.options["first_layer"]) < 1:
            raise InputError(f"pdrop: first_layer must be >= 1, got {self.options['first_layer']}")
        if int(self.options["num_stages"]) < 1:
            raise InputError(f"pdrop: num_stages must be >= 1, got {self.options['num_stages']}")
        self._schedules: dict[int, Schedule] = {}

    def schedule(self, num_layers: int) -> Schedule:
        num_layers = int(num_layers)
        if num_layers in self._schedules:
            return self._schedules[num_layers]
        layers, lam = self.options["layers"], self.options["lam"]
        first = int(self.options["first_layer"])
        if layers is not None:
            for layer in layers:
                self._check_layer(layer, num_layers, "pdrop stage layer", minimum=1)
        paper = PAPER_SCHEDULES.get((round(self.retention, 6), num_layers))
        if layers is not None and lam is not None:
            source = "given"
            achieved = layer_averaged(layers, float(lam), num_layers)
            if abs(achieved - self.retention) > TOLERANCE:
                raise InputError(
                    f"pdrop: layers {layers} with lam={lam} give a layer-averaged retention of {achieved:.4f}, not the "
                    f"requested {self.retention:.4f}; set lam: null to solve for it"
                )
        elif layers is None and lam is None and self.options["schedule"] == "paper" and paper is not None:
            source, (layers, lam) = "paper", paper
        else:
            if layers is None:
                self._check_layer(first, num_layers, "pdrop first_layer", minimum=1)
            if layers is None and lam is None:
                layers = default_layers(num_layers, first)
            if lam is None:
                source, lam = "solved", solve_lambda(layers, num_layers, self.retention)
            else:
                source = "searched"
                layers = search_layers(num_layers, float(lam), self.retention, first, int(self.options["num_stages"]))
        result = Schedule(tuple(int(x) for x in layers), float(lam), num_layers, self.count_rule, source)
        self._schedules[num_layers] = result
        return result

    def renumbers(self, prompt: VisualPrompt) -> bool:
        """Whether positions are renumbered after each drop (`renumber_positions`; auto = 1-D RoPE only)."""
        setting, m_rope = self.options["renumber_positions"], prompt.position_ids.dim() == 3
        if setting is True and m_rope:
            raise InputError("pdrop: renumber_positions is defined for 1-D RoPE models only (Qwen2-VL uses M-RoPE)")
        return (not m_rope) if setting == "auto" else bool(setting)

    def plan(self, vlm: VLM, prompt: VisualPrompt) -> PrunePlan:
        renumber = self.renumbers(prompt)
        sched = self.schedule(vlm.decoder.num_layers)
        plan = PrunePlan(renumber_positions=renumber, info={"method": self.name, "layers": list(sched.layers), "lam": sched.lam,
                                                            "renumber_positions": renumber})
        for layer, ratio in zip(sched.layers, sched.ratios):

            def select(view: TokenView, ratio: float = ratio):
                row = view.attention(torch.tensor([view.last_index], device=view.hidden.device))  # this layer's own weights: [H, 1, n]
                scores = row.mean(0)[0, view.visual_index]
                return view.keep_top(scores, self.budget(view, ratio)), scores

            plan.selectors[layer] = tracked(plan, layer, select)
        return plan

    def visual_tokens_per_layer(self, n_visual: int, num_layers: int) -> list[int]:
        return self.schedule(num_layers).counts(n_visual)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["schedules"] = {
            str(n): {"layers": list(s.layers), "lam": s.lam, "nominal_retention": s.nominal_retention, "source": s.source}
            for n, s in self._schedules.items()
        }
        return out
