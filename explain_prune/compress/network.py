"""f_θ (paper §3.3, App. B): A_v^0 -> R̃_v, a 1-D fully convolutional network.

    input normalisation -> 5 x [depthwise Conv1d(k=3) -> pointwise Conv1d -> activation]
    (channels 32-64-128-256-512) -> pointwise Conv1d -> 1 logit per token -> masked softmax

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
from explain_prune.explain.attention import A0_QUERIES

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
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    kernel_size: int = field(default=3, metadata={"minimum": 1})
    activation: str = field(default="relu", metadata={"choices": tuple(ACTIVATIONS)})
    input_norm: str = field(default="mean", metadata={"choices": INPUT_NORMS})
    eps: float = field(default=1e-6, metadata={"minimum": 0.0})
    a0_query: str = field(default="instruction", metadata={"choices": A0_QUERIES})

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FThetaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"compressor config has unknown keys {unknown} (known: {sorted(known)})")
        return cls(**{k: (list(v) if k == "channels" else v) for k, v in data.items()})


def normalise_input(a0: torch.Tensor, mask: torch.Tensor, how: str, eps: float) -> torch.Tensor:
    """Per-sample scaling of A_v^0 over its valid tokens; padded positions are 0."""
    maskf = mask.to(a0.dtype)
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


@COMPRESSORS.register("ftheta")
class FTheta(nn.Module):
    """f_θ: forward(a0 [B, N], mask [B, N] bool) -> R̃_v [B, N] (rows sum to 1 over valid tokens)."""

    config_class = FThetaConfig

    def __init__(self, config: FThetaConfig | Mapping[str, Any] | None = None):
        super().__init__()
        if config is None:
            config = FThetaConfig()
        elif not isinstance(config, FThetaConfig):
            config = FThetaConfig.from_dict(config)
        self.config = config
        blocks = []
        c_in = 1
        for c_out in config.channels:
            blocks.append(SeparableBlock(c_in, c_out, config.kernel_size, config.activation))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv1d(c_in, 1, 1)

    @staticmethod
    def _mask(a0: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones_like(a0, dtype=torch.bool)
        if mask.shape != a0.shape:
            raise InputError(f"mask shape {tuple(mask.shape)} != a0 shape {tuple(a0.shape)}")
        return mask.to(torch.bool)

    def logits(self, a0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token scores [B, N]; padded positions are -inf."""
        single = a0.dim() == 1
        if single:
            a0 = a0.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        mask = self._mask(a0, mask)
        a0 = a0.to(self.head.weight.dtype)
        maskf = mask.to(a0.dtype).unsqueeze(1)  # [B, 1, N]
        x = normalise_input(a0, mask, self.config.input_norm, self.config.eps).unsqueeze(1)
        for block in self.blocks:
            x = block(x, maskf)
        out = self.head(x).squeeze(1).masked_fill(~mask, float("-inf"))
        return out[0] if single else out

    def log_prob(self, a0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked log-softmax: log R̃_v, -inf on padded positions."""
        return torch.log_softmax(self.logits(a0, mask), dim=-1)

    def forward(self, a0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.softmax(self.logits(a0, mask), dim=-1)


def save_compressor(path: str | Path, model: FTheta) -> Path:
    """Write f_θ's weights + its config (JSON in the safetensors metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "ftheta_config": json.dumps(model.config.to_dict(), sort_keys=True)}
    save_safetensors_atomic(state, path, metadata=metadata)
    return path


def load_compressor(path: str | Path, map_location: str | torch.device = "cpu") -> FTheta:
    """Rebuild f_θ from a file written by `save_compressor` (eval mode)."""
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
        stored = json.loads(metadata["ftheta_config"])
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
        config = FThetaConfig.from_dict(stored)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError; int("abc") for a channel
        raise InputError(f"{path}: malformed ftheta_config metadata ({err})") from None
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{path}: non-finite values in weight {name!r}")
    model = FTheta(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{path}: weights do not match the stored config: {str(err).splitlines()[0]}") from None
    return model.to(map_location).eval()


__all__ = ["FThetaConfig", "FTheta", "save_compressor", "load_compressor", "normalise_input"]
