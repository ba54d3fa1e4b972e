"""f_θ (paper §3.3, App. B): A_v^0 -> R̃_v, a 1-D fully convolutional network.

    input normalisation -> 5 x [depthwise Conv1d(k=3) -> pointwise Conv1d -> activation]
    (channels 32-64-128-256-512) -> pointwise Conv1d -> 1 logit per token -> masked softmax

Its input is the paper's one channel, A_v^0, by default; `inputs` stacks other layer-0 per-token
features as further channels (`explain.attention.FIRST_LAYER_FEATURES`: per-head A_v^0, key/value
norms), the variants of conf/compressor/ (docs/synthetic.md §Compressor variants).

A compressor is any `COMPRESSORS` class: an nn.Module with a dataclass `config_class` (holding at
least `inputs`, `in_channels` and `a0_query`), `logits(x [B, C, N], mask [B, N]) -> [B, N]` and
`flops(n_visual)`; `Compressor` gives it the softmax, the file format and the input stacking.
A new one is its module plus its conf/compressor yaml (`name:` its registry key).

Batches hold samples of different lengths padded to the longest; padded positions are zeroed
after every convolution (and the bias of the pointwise convs is masked too), so a sample's output
is the same alone or next to longer samples — the convolutions' own zero padding is exactly what
a sample sees at its end either way.

The configuration is a plain dataclass (`FThetaConfig`) stored as JSON in the safetensors
metadata by `save_compressor`, so `load_compressor(path)` rebuilds the network from the file alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from explain_prune.core import InputError, save_safetensors_atomic
from explain_prune.core.registry import Registry
from explain_prune.engine.flops import compressor_flops
from explain_prune.explain.attention import A0_QUERIES, FIRST_LAYER_FEATURES

FORMAT = "explain_prune.ftheta/1"
MAX_CHANNELS = 8192  # a guard against a garbled file: f_θ uses tens of channels, and 8192² conv weights are 256 MB
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}
INPUT_NORMS = ("mean", "log", "zscore", "none")


@dataclass
class FThetaConfig:
    """Hyper-parameters of f_θ (conf/compressor/*.yaml).

    input_norm: how A_v^0 is scaled before the convs —
      "mean":   x / mean(x) over the sample's tokens (values ~1, independent of N_v; default),
      "log":    log(x / mean(x) + eps),
      "zscore": (x - mean) / std over the sample's tokens,
      "none":   raw attention (its scale shrinks as 1/N_v).
    a0_query: which layer-0 query rows the A_v^0 it reads averages (`explain.attention.A0_QUERIES`);
      train copies it from the cache, so `method=ours` computes the same feature at inference.
    inputs: the per-token features stacked as input channels, in order (FIRST_LAYER_FEATURES).
    in_channels: their total width; train sets it from the cache (a0_heads has one channel per
      attention head), so a file records what it reads.  The paper's ["a0"] is 1.
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    kernel_size: int = field(default=3, metadata={"minimum": 1})
    activation: str = field(default="relu", metadata={"choices": tuple(ACTIVATIONS)})
    input_norm: str = field(default="mean", metadata={"choices": INPUT_NORMS})
    eps: float = field(default=1e-6, metadata={"minimum": 0.0})
    a0_query: str = field(default="instruction", metadata={"choices": A0_QUERIES})
    inputs: list[str] = field(default_factory=lambda: ["a0"])
    in_channels: int | None = field(default=None, metadata={"minimum": 1})

    def __post_init__(self) -> None:
        if isinstance(self.channels, (str, bytes)) or not isinstance(self.channels, Sequence):
            raise InputError(f"compressor channels must be a list of positive ints, got {self.channels!r}")
        self.channels = [int(c) for c in self.channels]
        self.kernel_size = int(self.kernel_size)
        self.eps = float(self.eps)
        if not self.channels or any(not 0 < c <= MAX_CHANNELS for c in self.channels):
            raise InputError(
                f"compressor channels must be a non-empty list of ints in [1, {MAX_CHANNELS}], got {self.channels}"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise InputError(f"compressor kernel_size must be a positive odd int, got {self.kernel_size}")
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"compressor activation {self.activation!r} unknown (known: {', '.join(ACTIVATIONS)})"
            )
        if self.input_norm not in INPUT_NORMS:
            raise InputError(f"compressor input_norm {self.input_norm!r} unknown (known: {', '.join(INPUT_NORMS)})")
        if self.a0_query not in A0_QUERIES:
            raise InputError(f"compressor a0_query {self.a0_query!r} unknown (known: {', '.join(A0_QUERIES)})")
        check_inputs(self.inputs)
        self.inputs = list(self.inputs)
        if self.in_channels is None and self.inputs == ["a0"]:
            self.in_channels = 1
        if self.in_channels is not None:
            self.in_channels = int(self.in_channels)
            if not 0 < self.in_channels <= MAX_CHANNELS:
                raise InputError(f"compressor in_channels must be in [1, {MAX_CHANNELS}], got {self.in_channels}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FThetaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"compressor config has unknown keys {unknown} (known: {sorted(known)})")
        return cls(**{k: (list(v) if k in ("channels", "inputs") else v) for k, v in data.items()})


def check_inputs(inputs: Any) -> None:
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or not inputs:
        raise InputError(f"compressor inputs must be a non-empty list of feature names, got {inputs!r}")
    unknown = [name for name in inputs if name not in FIRST_LAYER_FEATURES]
    if unknown:
        raise InputError(f"compressor inputs: {unknown[0]!r} unknown (known: {', '.join(FIRST_LAYER_FEATURES)})")
    if len(set(inputs)) != len(inputs):
        raise InputError(f"compressor inputs: a feature is listed twice in {list(inputs)}")


def stack_inputs(a0: torch.Tensor, features: Mapping[str, torch.Tensor], inputs: Sequence[str]) -> torch.Tensor:
    """[C, N]: the named per-token features (a0 [N], the others [N] or [N, C_f]) as channels, in order."""
    channels = []
    for name in inputs:
        value = a0 if name == "a0" else features.get(name)
        if value is None:
            raise InputError(f"compressor input {name!r} missing (given: a0, {', '.join(sorted(features)) or 'nothing else'})")
        channels.append(value[None, :] if value.dim() == 1 else value.transpose(0, 1))
    return torch.cat(channels, dim=0)


def normalise_input(a0: torch.Tensor, mask: torch.Tensor, how: str, eps: float) -> torch.Tensor:
    """Per-sample, per-channel scaling over the valid tokens (last dim; `mask` broadcasts to `a0`,
    e.g. [B, 1, N] for [B, C, N]); padded positions are 0."""
    maskf = mask.to(a0.dtype).expand_as(a0)
    n = maskf.sum(-1, keepdim=True).clamp(min=1.0)
    x = a0 * maskf
    if how == "none":
        return x
    mean = x.sum(-1, keepdim=True) / n
    if how == "mean":
        return x / mean.clamp(min=eps) * maskf
    if how == "log":
        return torch.log(x / mean.clamp(min=eps) + eps) * maskf
    if how == "zscore":
        var = (((x - mean) * maskf) ** 2).sum(-1, keepdim=True) / n
        return (x - mean) / (var.sqrt() + eps) * maskf
    raise InputError(f"compressor input_norm {how!r} unknown (known: {', '.join(INPUT_NORMS)})")


class SeparableBlock(nn.Module):
    """Depthwise Conv1d(k) -> pointwise Conv1d -> activation, masking padding after each conv."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, activation: str):
        super().__init__()
        self.depthwise = nn.Conv1d(c_in, c_in, kernel_size, padding=kernel_size // 2, groups=c_in)
        self.pointwise = nn.Conv1d(c_in, c_out, 1)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor, maskf: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(x) * maskf
        x = self.pointwise(x) * maskf
        return self.act(x) * maskf


COMPRESSORS: Registry = Registry("compressor")  # @COMPRESSORS.register(name); settings: its config_class


class Compressor(nn.Module):
    """What every compressor shares: R̃_v as the masked softmax of `logits`, and input handling.

    Inputs are x [B, C, N] (C = config.in_channels), or [B, N] / [N] when C = 1; mask [B, N] bool.
    """

    config_class: type = FThetaConfig
    name: str

    def __init__(self, config: Any = None):
        super().__init__()
        if config is None:
            config = self.config_class()
        elif not isinstance(config, self.config_class):
            config = self.config_class.from_dict(config)
        if config.in_channels is None:
            raise InputError(
                f"compressor inputs {config.inputs}: in_channels unknown (train sets it from the cache's features)"
            )
        self.config = config

    def _prepare(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x [B, C, N], mask [B, N] bool, whether the caller passed one unbatched sample)."""
        single = x.dim() == 1
        if single:
            x, mask = x[None], (None if mask is None else mask[None])
        if x.dim() == 2:
            x = x[:, None, :]
        if x.dim() != 3 or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"compressor input of shape {tuple(x.shape)}: expected [B, {self.config.in_channels}, N] "
                f"(inputs {self.config.inputs})"
            )
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
        elif tuple(mask.shape) != (x.shape[0], x.shape[2]):
            raise InputError(f"mask shape {tuple(mask.shape)} does not match input {tuple(x.shape)} ([B, N] needed)")
        return x, mask.to(torch.bool), single

    def logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def flops(self, n_visual: int) -> float:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked log-softmax: log R̃_v, -inf on padded positions."""
        return torch.log_softmax(self.logits(x, mask), dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.softmax(self.logits(x, mask), dim=-1)


@COMPRESSORS.register("ftheta")
class FTheta(Compressor):
    """f_θ: forward(x [B, C, N] or a0 [B, N], mask [B, N] bool) -> R̃_v [B, N] (rows sum to 1 over valid tokens)."""

    config_class = FThetaConfig

    def __init__(self, config: FThetaConfig | Mapping[str, Any] | None = None):
        super().__init__(config)
        config = self.config
        blocks = []
        c_in = config.in_channels
        for c_out in config.channels:
            blocks.append(SeparableBlock(c_in, c_out, config.kernel_size, config.activation))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv1d(c_in, 1, 1)

    def logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token scores [B, N]; padded positions are -inf."""
        x, mask, single = self._prepare(x, mask)
        x = x.to(self.head.weight.dtype)
        maskf = mask.to(x.dtype).unsqueeze(1)  # [B, 1, N]
        x = normalise_input(x, maskf, self.config.input_norm, self.config.eps)
        for block in self.blocks:
            x = block(x, maskf)
        out = self.head(x).squeeze(1).masked_fill(~mask, float("-inf"))
        return out[0] if single else out

    def flops(self, n_visual: int) -> float:
        """Eq. 6 for this network (its input channels included)."""
        return compressor_flops(n_visual, self.config.channels, self.config.kernel_size, self.config.in_channels)


def build_compressor(name: str, config: Mapping[str, Any]) -> Compressor:
    """The registered compressor `name` (conf/compressor `name:`) built from its config mapping."""
    return COMPRESSORS.get(name)(config)


def save_compressor(path: str | Path, model: Compressor) -> Path:
    """Write a compressor's weights + its registry name and config (JSON in the safetensors metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "compressor": model.name,
        "ftheta_config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    save_safetensors_atomic(state, path, metadata=metadata)
    return path


def load_compressor(path: str | Path, map_location: str | torch.device = "cpu") -> Compressor:
    """Rebuild a compressor from a file written by `save_compressor` (eval mode); files from before
    the registry name was recorded are f_θ."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"compressor file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"unreadable compressor file {path}: {err}") from None
    if metadata.get("format") != FORMAT or "ftheta_config" not in metadata:
        raise InputError(f"{path} is not an f_θ file (no {FORMAT} metadata)")
    try:
        cls = COMPRESSORS.get(metadata.get("compressor", "ftheta"))
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    try:
        stored = json.loads(metadata["ftheta_config"])
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
        config = cls.config_class.from_dict(stored)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError; int("abc") for a channel
        raise InputError(f"{path}: malformed ftheta_config metadata ({err})") from None
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{path}: non-finite values in weight {name!r}")
    try:
        model = cls(config)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{path}: weights do not match the stored config: {str(err).splitlines()[0]}") from None
    return model.to(map_location).eval()


__all__ = [
    "COMPRESSORS",
    "Compressor",
    "FThetaConfig",
    "FTheta",
    "build_compressor",
    "save_compressor",
    "load_compressor",
    "normalise_input",
    "stack_inputs",
]
