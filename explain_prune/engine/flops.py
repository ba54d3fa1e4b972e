"""FLOPs and KV-cache accounting of the visual-token part (paper App. C, Eq. 4-6).

`dims` is the `llm:` block of conf/model/*.yaml (hidden_size, intermediate_size, num_layers,
num_kv_heads, head_dim), so no weights are needed.  FLOP counts are returned as plain numbers
(multiply-accumulates counted once, as in the paper); `tera(x)` converts for display.

Eq. 4 as printed in the paper reads ``4nd^2 + 2n^2d + l n m`` with l = 3 "layers in the FFN". That
FFN term is dimensionally wrong (it drops d): the paper's own figures (11.69 T for n=1568,
d=3584, m=18944, l=3, N_L=28, and Tables 9/10: 12.9 / 9.6 / 52.7 / 48.4 / 27.0 T) are only
reproduced with ``l * n * d * m`` (three d x m projections: gate, up, down).  We implement the
form that reproduces the figures.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from explain_prune.core import InputError

FFN_MATRICES = 3  # gate, up and down projections of a SwiGLU FFN (the paper's l)
PAPER_COMPRESSOR_CHANNELS = (32, 64, 128, 256, 512)


def tera(flops: float) -> float:
    """FLOPs -> trillions (the paper's "T")."""
    return float(flops) / 1e12


def _dim(dims: Mapping[str, Any], key: str) -> int:
    if key not in dims or dims[key] is None:
        raise InputError(f"model llm dims lack {key!r} (have: {', '.join(sorted(dims))})")
    value = int(dims[key])
    if value <= 0:
        raise InputError(f"model llm dims: {key} must be positive, got {value}")
    return value


def layer_flops(dims: Mapping[str, Any], n: int, ffn_matrices: int = FFN_MATRICES) -> float:
    """Eq. 4 for one decoder layer with n visual tokens: 4nd^2 + 2n^2d + l*n*d*m (see module doc)."""
    d = _dim(dims, "hidden_size")
    m = _dim(dims, "intermediate_size")
    n = int(n)
    if n < 0:
        raise InputError(f"number of visual tokens must be >= 0, got {n}")
    return float(4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m)


def llm_flops(
    dims: Mapping[str, Any], visual_tokens_per_layer: int | Sequence[int], ffn_matrices: int = FFN_MATRICES
) -> float:
    """FLOPs of the whole LLM on the visual tokens: Σ_layers Eq. 4 with that layer's token count.

    `visual_tokens_per_layer` has one count per decoder layer (so multi-stage methods are exact);
    a single int means the same count in every layer (FLOPs_LLM = N_L * Eq. 4).
    """
    num_layers = _dim(dims, "num_layers")
    if isinstance(visual_tokens_per_layer, int):
        counts = [visual_tokens_per_layer] * num_layers
    else:
        counts = [int(c) for c in visual_tokens_per_layer]
        if len(counts) != num_layers:
            raise InputError(
                f"visual_tokens_per_layer has {len(counts)} entries but the model has {num_layers} layers"
            )
    return float(sum(layer_flops(dims, c, ffn_matrices) for c in counts))


def first_layer_attention_flops(dims: Mapping[str, Any], n: int) -> float:
    """Eq. 5: nd^2 + nd (key projection of the visual tokens + text->visual attention scores)."""
    d = _dim(dims, "hidden_size")
    return float(int(n) * d * d + int(n) * d)


def compressor_flops(
    n: int,
    channels: Sequence[int] = PAPER_COMPRESSOR_CHANNELS,
    kernel: int = 3,
    in_channels: int = 1,
    include_head: bool = False,
) -> float:
    """Eq. 6: Σ_l n (C_in^l k + C_in^l C_out^l) over the depthwise-separable conv layers of f_θ.

    The paper's sum covers the L=5 separable layers only; `include_head=True` adds the final
    pointwise C_last -> 1 projection (n * C_last), which is < 0.3 % of the total.
    """
    total = 0
    c_in = int(in_channels)
    for c_out in channels:
        total += int(n) * (c_in * int(kernel) + c_in * int(c_out))
        c_in = int(c_out)
    if include_head:
        total += int(n) * c_in
    return float(total)


def kv_cache_bytes(dims: Mapping[str, Any], tokens_per_layer: int | Sequence[int], bytes_per_value: int = 2) -> int:
    """Σ_layers 2 (K and V) * kv_heads * head_dim * tokens * bytes (GQA-aware, as the paper's Table 4)."""
    num_layers = _dim(dims, "num_layers")
    kv_heads = _dim(dims, "num_kv_heads")
    head_dim = _dim(dims, "head_dim")
    if isinstance(tokens_per_layer, int):
        counts = [tokens_per_layer] * num_layers
    else:
        counts = [int(c) for c in tokens_per_layer]
        if len(counts) != num_layers:
            raise InputError(f"tokens_per_layer has {len(counts)} entries but the model has {num_layers} layers")
    return int(sum(2 * kv_heads * head_dim * c * int(bytes_per_value) for c in counts))


def layer_averaged_retention(kept_per_layer: Sequence[int], n: int) -> float:
    """Mean over layers of kept/n (the '*' retention of multi-stage methods such as PDrop)."""
    kept = [int(k) for k in kept_per_layer]
    if not kept:
        raise InputError("kept_per_layer is empty")
    if int(n) <= 0:
        raise InputError(f"number of visual tokens must be positive, got {n}")
    return float(sum(kept)) / (len(kept) * int(n))


__all__ = [
    "tera",
    "layer_flops",
    "llm_flops",
    "first_layer_attention_flops",
    "compressor_flops",
    "kv_cache_bytes",
    "layer_averaged_retention",
]


# --- CLI: python -m explain_prune.flops model=<m> n_visual=<n> method=<name> retention=<r> ---------------

def method_report(dims: Mapping[str, Any], method: Any, n_visual: int, bytes_per_value: int = 2) -> dict[str, Any]:
    """FLOPs / KV / retention of `method`'s visual-token schedule next to the unpruned model's."""
    n = int(n_visual)
    if n <= 0:
        raise InputError(f"n_visual must be a positive number of visual tokens, got {n_visual}")
    num_layers = _dim(dims, "num_layers")
    counts = method.visual_tokens_per_layer(n, num_layers)
    llm = llm_flops(dims, counts)
    vanilla = llm_flops(dims, n)
    overhead = {key: float(value) for key, value in method.overhead_flops(dims, n).items()}
    total = llm + sum(overhead.values())
    kv = kv_cache_bytes(dims, method.kv_tokens_per_layer(n, num_layers), bytes_per_value)
    kv_vanilla = kv_cache_bytes(dims, n, bytes_per_value)
    report: dict[str, Any] = {
        **method.describe(),
        "method": method.name,
        "n_visual": n,
        "num_layers": num_layers,
        "visual_tokens_per_layer": counts,
        "layer_avg_retention": layer_averaged_retention(counts, n),
        "flops_T": tera(total),
        "llm_flops_T": tera(llm),
        "vanilla_flops_T": tera(vanilla),
        "flops_ratio": total / vanilla,
        "kv_cache_bytes": kv,
        "vanilla_kv_cache_bytes": kv_vanilla,
        "kv_cache_MiB": kv / 2**20,
        "vanilla_kv_cache_MiB": kv_vanilla / 2**20,
        "kv_ratio": kv / kv_vanilla,
        "bytes_per_value": int(bytes_per_value),
    }
    report.pop("name", None)
    if overhead:
        report["overhead"] = {
            **{f"{key}_T": tera(value) for key, value in overhead.items()},
            **{f"{key}_share_of_vanilla": value / vanilla for key, value in overhead.items()},
        }
    return report
