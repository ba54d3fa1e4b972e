"""CPU benchmark (not a test): does input-stage pruning deliver the prefill speed-up its FLOPs
predict, and what does `ours` (A_v^0 + f_θ) cost next to a full-depth prefill?

The language model is Qwen2-VL's architecture at Qwen2-VL-7B's real widths (hidden 3584,
intermediate 18944, 28 heads / 4 kv heads, M-RoPE [16, 24, 24]) with only `--layers` decoder
layers and random weights, built straight from a transformers config (no adapter yaml, no vision
tower, a small vocabulary).  The prompt is a 384x512-style image sequence: system text, ~1300
visual tokens on a 3-D M-RoPE grid, the question, the assistant template.

Printed, in one run:
  * measured prefill speed-up of `ours` at 50 % and 25 % retention (engine.generate, remove mode,
    overhead included; wall and process-CPU time) beside the FLOPs-predicted one (Eq. 4 over all
    tokens of the sequence; the paper's visual-token-only form in the last column) and the
    measured / predicted ratio (target >= 0.9), both for the built depth and extrapolated to 28
    layers (measured per-layer time x 28 + the once-per-prompt A_v^0 + f_θ time);
  * the measured cost of ours' overhead (first_layer_attention + f_θ at the paper's channel widths)
    as a share of a 28-layer vanilla prefill, extrapolated from the measured per-layer time
    (target <= 1 %; the paper's FLOPs estimate is 0.17 %).

Each timing is the median of `--repeats` runs, taken in interleaved rounds (vanilla, 50 %, 25 %, ...)
so that other jobs on a shared machine slow every configuration alike.  bf16 or fp32 is picked by a quick matmul probe.
    python scripts/bench_efficiency.py [--layers 2] [--visual 1300] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Qwen2VLTextConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain_prune.compress.network import FTheta, FThetaConfig, save_compressor  # noqa: E402
from explain_prune.engine import generate  # noqa: E402
from explain_prune.explain import first_layer_attention  # noqa: E402
from explain_prune.engine.flops import (  # noqa: E402
    PAPER_COMPRESSOR_CHANNELS,
    compressor_flops,
    first_layer_attention_flops,
    llm_flops,
)
from explain_prune.methods import build_method  # noqa: E402
from explain_prune.models.base import VLM, DecoderParts, VisualPrompt  # noqa: E402

QWEN2VL_7B = dict(hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4, head_dim=128, num_layers=28)
PREFIX, QUESTION, SUFFIX = 14, 24, 5  # text tokens around the visual span (system turn, question, template)


class BenchVLM(VLM):
    """Just the decoder parts the engine drives; no vision tower, tokenizer or generate."""

    family = "bench"

    def __init__(self, text_model: Qwen2VLTextModel, lm_head: nn.Linear):
        super().__init__("qwen2vl7b-widths")
        self.model = nn.ModuleDict({"text": text_model, "lm_head": lm_head})
        self.text_model, self.lm_head = text_model, lm_head

    def prepare(self, sample):
        raise TypeError("BenchVLM has no vision tower: build_prompt() makes its VisualPrompt directly")

    @property
    def decoder(self) -> DecoderParts:
        lm = self.text_model
        return DecoderParts(lm.embed_tokens, lm.layers, lm.norm, self.lm_head, lm.rotary_emb, lm.config)

    @property
    def eos_token_ids(self) -> list[int]:
        return [-1]

    def decode(self, token_ids) -> str:
        return " ".join(str(int(t)) for t in token_ids)


def pick_dtype(threads: int) -> torch.dtype:
    """The faster of bf16 / fp32 for a decoder-sized matmul on this CPU."""
    best, best_time = torch.float32, float("inf")
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(512, 3584).to(dtype)
        w = (torch.randn(4096, 3584) * 0.02).to(dtype)
        torch.nn.functional.linear(a, w)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            times.append(time.perf_counter() - start)
        if min(times) < best_time:
            best, best_time = dtype, min(times)
    return best


def build_model(layers: int, dtype: torch.dtype) -> BenchVLM:
    config = Qwen2VLTextConfig(
        vocab_size=1024,
        hidden_size=QWEN2VL_7B["hidden_size"],
        intermediate_size=QWEN2VL_7B["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=QWEN2VL_7B["num_heads"],
        num_key_value_heads=QWEN2VL_7B["num_kv_heads"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    text = Qwen2VLTextModel(config).to(dtype).eval()
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=False).to(dtype)
    return BenchVLM(text, head).eval()


def build_prompt(vlm: BenchVLM, n_visual: int) -> VisualPrompt:
    """Text, an h x w visual grid with Qwen2-VL's M-RoPE ids, the question and the template."""
    h = max(1, round((n_visual * 3 / 4) ** 0.5))  # a 384x512-like aspect ratio
    w = -(-n_visual // h)
    n_visual = h * w
    length = PREFIX + n_visual + QUESTION + SUFFIX
    gen = torch.Generator().manual_seed(1)
    embeds = (torch.randn(1, length, vlm.decoder.hidden_size, generator=gen) * 0.5).to(vlm.dtype)
    text_before = torch.arange(PREFIX)
    grid_t = torch.zeros(n_visual, dtype=torch.long)
    grid_h = torch.arange(h).repeat_interleave(w)
    grid_w = torch.arange(w).repeat(h)
    visual = torch.stack([grid_t, grid_h, grid_w]) + PREFIX
    after_start = int(visual.max()) + 1
    text_after = torch.arange(after_start, after_start + QUESTION + SUFFIX)
    positions = torch.cat([text_before.expand(3, -1), visual, text_after.expand(3, -1)], dim=1)[:, None, :]
    visual_index = torch.arange(PREFIX, PREFIX + n_visual)
    return VisualPrompt(
        inputs_embeds=embeds,
        position_ids=positions,
        attention_mask=torch.ones(1, length, dtype=torch.long),
        input_ids=torch.zeros(1, length, dtype=torch.long),
        visual_index=visual_index,
        instruction_index=torch.arange(PREFIX + n_visual, PREFIX + n_visual + QUESTION),
        visual_grid=(1, h, w),
        sample_id="bench",
    )


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers actually built (2-3)")
    parser.add_argument("--visual", type=int, default=1300, help="visual tokens (~1300: a 384x512 image on Qwen2-VL)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dtype = pick_dtype(args.threads) if args.dtype == "auto" else getattr(torch, args.dtype)
    vlm = build_model(args.layers, dtype)
    prompt = build_prompt(vlm, args.visual)
    n_visual, n_text = prompt.num_visual, prompt.length - prompt.num_visual
    params = sum(p.numel() for p in vlm.parameters())
    print(
        f"model: Qwen2-VL-7B widths, {args.layers} decoder layers, {params / 1e6:.0f} M params, {str(dtype).split('.')[-1]}, "
        f"{args.threads} threads; prompt: {n_visual} visual + {n_text} text tokens; median of {args.repeats}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = save_compressor(Path(tmp) / "ftheta.safetensors", FTheta(FThetaConfig(channels=list(PAPER_COMPRESSOR_CHANNELS))))
        ours = {r: build_method("ours", r, checkpoint=str(ckpt)) for r in (0.5, 0.25)}

        def prefill(method) -> tuple[float, float]:
            """(wall, process CPU) seconds of one prefill (generate with a single new token)."""
            wall, cpu = time.perf_counter(), time.process_time()
            generate(vlm, prompt, method, max_new_tokens=1)
            return time.perf_counter() - wall, time.process_time() - cpu

        runs = {"vanilla": None, **{f"{r:.0%}": m for r, m in ours.items()}}
        with torch.no_grad():
            prefill(ours[0.25])  # warm-up (allocator, kernels)
            # interleaved rounds: other jobs on a shared machine slow every configuration alike
            times: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
            for _ in range(args.repeats):
                for label, method in runs.items():
                    times[label].append(prefill(method))
            wall = {label: statistics.median(t[0] for t in ts) for label, ts in times.items()}
            cpu = {label: statistics.median(t[1] for t in ts) for label, ts in times.items()}
            vanilla = wall["vanilla"]
            per_layer = vanilla / args.layers
            dims = {**QWEN2VL_7B, "num_layers": args.layers}
            method = ours[0.25]
            overhead = median_time(lambda: method.predict(vlm, prompt), max(5, args.repeats))
            a0_only = median_time(lambda: first_layer_attention(vlm, prompt), max(5, args.repeats))
            print(
                f"vanilla prefill: {vanilla:.2f} s wall, {cpu['vanilla']:.2f} s CPU ({per_layer:.2f} s per layer); "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            )
            depth = QWEN2VL_7B["num_layers"]
            print(
                f"{'retention':>9} {'kept':>5} {'wall s':>7} {'speed-up':>9} {'CPU s':>7} {'speed-up':>9} {'predicted':>9} "
                f"{'meas/pred':>9} | {'28-layer':>9} {'meas/pred':>9} | {'pred visual-only (Eq.4)':>23}"
            )
            for r, method in ours.items():
                label = f"{r:.0%}"
                kept = method.keep_count(n_visual)
                predicted_all = llm_flops(dims, n_visual + n_text) / llm_flops(dims, kept + n_text)
                predicted_visual = llm_flops(dims, n_visual) / llm_flops(dims, kept)
                speed_wall = vanilla / wall[label]
                speed_cpu = cpu["vanilla"] / cpu[label]
                # the f_θ overhead is paid once, the layers 28 times: extrapolate to the real depth
                pruned_layer = max(wall[label] - overhead, 1e-9) / args.layers
                speed_deep = (per_layer * depth) / (pruned_layer * depth + overhead)
                print(
                    f"{r:>9.0%} {kept:>5d} {wall[label]:>7.2f} {speed_wall:>8.2f}x {cpu[label]:>7.2f} {speed_cpu:>8.2f}x "
                    f"{predicted_all:>8.2f}x {speed_wall / predicted_all:>9.1%} | {speed_deep:>8.2f}x "
                    f"{speed_deep / predicted_all:>9.1%} | {predicted_visual:>22.2f}x"
                )
        full_depth = per_layer * QWEN2VL_7B["num_layers"]
        full_dims = dict(QWEN2VL_7B)
        flops_share = (first_layer_attention_flops(full_dims, n_visual) + compressor_flops(n_visual)) / llm_flops(full_dims, n_visual)
        print(
            f"ours overhead (A_v^0 + f_θ): {overhead * 1e3:.1f} ms (A_v^0 alone {a0_only * 1e3:.1f} ms) = "
            f"{overhead / full_depth:.3%} of a 28-layer vanilla prefill ({full_depth:.1f} s extrapolated); "
            f"FLOPs estimate (Eq. 5 + 6 / Eq. 4): {flops_share:.3%}; paper: 0.17 %"
        )


if __name__ == "__main__":
    main()
