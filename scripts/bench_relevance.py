"""Benchmark: memory and time of Eq. 1 relevance at Qwen2-VL-7B's attention shape, in one run.

The model is a random-weight Qwen2-VL built from a config (no download) with the 7B's attention:
hidden 3584, 28 query heads x head_dim 128, 4 KV heads, M-RoPE sections (16, 24, 24); the MLP is
narrowed (`--mlp`, default 512) to keep CPU time sane — it does not change the attention maps.
For each depth (`--layers`) and visual-token count (`--tokens`), in a fresh subprocess each:

* `plain`: an sdpa forward with the graph + one backward per answer token (what any gradient
  method pays);
* `relevance`: explain.relevance (per-layer recomputation, `--head-block` heads' maps at a time);
* `maps kept` (only at N <= `--previous-max`): the previous algorithm, which keeps every layer's
  eager attention map alive for the answer tokens' backward passes (the time baseline).

Peak memory is the process's resident-set high-water mark during the call minus its resident set
before it (`/proc/self/clear_refs` resets the mark), on CUDA `torch.cuda.max_memory_allocated`.
The target is relevance peak <= plain peak + 2 x one layer's attention-map bytes (H * N^2 * 4),
at every depth.  Ratios are what to compare: seconds vary with the machine.

    python scripts/bench_relevance.py [--tokens 1000 2000 4000 6000] [--layers 2 4] [--answer 4]
                                      [--mlp 512] [--head-block 4] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128  # Qwen2-VL-7B's language model


def build(layers: int, tokens: int, mlp: int, device: str):
    """The 7B-attention-shaped model on `device` and a prompt of ~`tokens` visual tokens (float32)."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    from explain_prune.core import Sample
    from explain_prune.models import build_vlm

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny_qwen2vl.yaml")
    cfg.tiny.update(hidden_size=HEADS * HEAD_DIM, intermediate_size=mlp, num_layers=layers, num_heads=HEADS,
                    num_kv_heads=KV_HEADS, mrope_section=[16, 24, 24], initializer_range=0.02)
    cfg.llm.head_dim = HEAD_DIM
    side = int((tokens * 28 * 28) ** 0.5) // 28 * 28
    cfg.image.max_pixels = side * side
    vlm = build_vlm(cfg).to(device)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    prompt = vlm.prepare(Sample(id="bench", question="What color is the object ?", images=[image]))
    prompt.inputs_embeds = prompt.inputs_embeds.to(device)
    prompt.position_ids = prompt.position_ids.to(device)
    return vlm, prompt, torch


def plain_passes(vlm, prompt, answer, torch) -> None:
    """An sdpa forward with the graph and one backward per answer token (input gradients only)."""
    ids = torch.as_tensor(answer, device=prompt.inputs_embeds.device)
    embeds = torch.cat([prompt.inputs_embeds, vlm.embed_text(ids[None, :-1])], 1).detach().requires_grad_(True)
    positions = torch.cat([prompt.position_ids, prompt.next_positions(len(answer) - 1).to(ids.device)], -1)
    with vlm.attention_implementation("sdpa"), torch.enable_grad():
        logits = vlm.model(inputs_embeds=embeds, position_ids=positions, use_cache=False, logits_to_keep=len(answer)).logits
        picked = logits[0].gather(-1, ids[:, None])[:, 0]
        for t in range(len(answer)):
            torch.autograd.grad(picked[t], embeds, retain_graph=t < len(answer) - 1)


def maps_kept(vlm, prompt, answer, torch):
    """The previous algorithm: an eager forward keeping every layer's map; per answer token one
    backward to all maps, folded top-down into the token's row (v <- v + v · mean_h (A ⊙ G)^+)."""
    ids = torch.as_tensor(answer, device=prompt.inputs_embeds.device)
    embeds = torch.cat([prompt.inputs_embeds, vlm.embed_text(ids[None, :-1])], 1).detach().requires_grad_(True)
    positions = torch.cat([prompt.position_ids, prompt.next_positions(len(answer) - 1).to(ids.device)], -1)
    with vlm.attention_implementation("eager"), torch.enable_grad():
        out = vlm.model(inputs_embeds=embeds, position_ids=positions, output_attentions=True, use_cache=False,
                        logits_to_keep=len(answer))
    picked = out.logits[0].gather(-1, ids[:, None])[:, 0]
    rows = []
    for t in range(len(answer)):
        grads = torch.autograd.grad(picked[t], out.attentions, retain_graph=t < len(answer) - 1)
        row = torch.zeros(embeds.shape[1], device=ids.device)
        row[prompt.length - 1 + t] = 1.0
        for attention, grad in zip(reversed(out.attentions), reversed(grads)):
            weighted = (attention[0] * grad[0]).clamp_(min=0)
            row = row + torch.matmul(row, weighted).sum(0) / weighted.shape[0]
        rows.append(row[prompt.visual_index])
    return torch.stack(rows).mean(0)


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_one(args: argparse.Namespace) -> dict:
    """One variant at one size, in this (fresh) process: seconds and extra peak bytes."""
    vlm, prompt, torch = build(args.layers[0], args.tokens[0], args.mlp, args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    answer = torch.randint(20, 200, (args.answer,)).tolist()
    from explain_prune.explain.relevance import relevance

    run = {
        "plain": lambda: plain_passes(vlm, prompt, answer, torch),
        "relevance": lambda: relevance(vlm, prompt, answer, head_block=args.head_block, batch_tokens=args.batch_tokens),
        "maps kept": lambda: maps_kept(vlm, prompt, answer, torch),
    }[args.one]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the resident-set high-water mark
        before = rss_bytes("VmRSS")
    start = time.perf_counter()
    result = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - before
    out = {"variant": args.one, "layers": args.layers[0], "visual": prompt.num_visual, "length": prompt.length,
           "seconds": seconds, "peak_bytes": peak}
    if result is not None:
        out["result"] = [float(v) for v in result]
    return out


def child(args: argparse.Namespace, variant: str, layers: int, tokens: int) -> dict:
    command = [sys.executable, __file__, "--one", variant, "--layers", str(layers), "--tokens", str(tokens),
               "--answer", str(args.answer), "--mlp", str(args.mlp), "--head-block", str(args.head_block),
               "--batch-tokens", str(args.batch_tokens), "--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        sys.exit(f"{variant} at {layers} layers, {tokens} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 2000, 4000, 6000], help="approximate visual tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--answer", type=int, default=4, help="answer tokens")
    parser.add_argument("--mlp", type=int, default=512, help="MLP width (narrowed; the 7B's is 18944)")
    parser.add_argument("--head-block", type=int, default=4)
    parser.add_argument("--batch-tokens", type=int, default=1)
    parser.add_argument("--previous-max", type=int, default=1000, help="largest N that also runs the maps-kept baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=["plain", "relevance", "maps kept"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args)))
        return
    print(f"Qwen2-VL-7B attention shape ({HEADS} heads x {HEAD_DIM}, {KV_HEADS} KV heads), MLP {args.mlp}, float32, "
          f"{args.answer} answer tokens, head_block {args.head_block}, batch_tokens {args.batch_tokens}, "
          f"{args.threads} threads, {args.device}")
    print("layers | visual | seq N | plain s | relev. s | rel/plain | plain GiB | relev. GiB | map GiB | "
          "relev.-plain (maps) | target | maps-kept s | relev./maps-kept | maps-kept GiB | max rel diff")
    failures = []
    for layers in args.layers:
        for tokens in args.tokens:
            plain = child(args, "plain", layers, tokens)
            rel = child(args, "relevance", layers, tokens)
            length = rel["length"]
            map_bytes = HEADS * length * length * 4
            excess = (rel["peak_bytes"] - plain["peak_bytes"]) / map_bytes
            ok = excess <= 2.0
            if not ok:
                failures.append(f"{layers} layers, N={length}: relevance peak exceeds plain + 2 maps")
            line = (f"{layers:6d} | {rel['visual']:6d} | {length:5d} | {plain['seconds']:7.1f} | {rel['seconds']:8.1f} | "
                    f"{rel['seconds'] / plain['seconds']:9.2f} | {gib(plain['peak_bytes'])}    | {gib(rel['peak_bytes'])}     | "
                    f"{gib(map_bytes)}  | {excess:+19.2f} | {'ok' if ok else 'MISSED':6s}")
            if tokens <= args.previous_max:
                old = child(args, "maps kept", layers, tokens)
                ref = old["result"]
                diff = max(abs(a - b) for a, b in zip(rel["result"], ref)) / max(abs(b) for b in ref)
                line += (f" | {old['seconds']:11.1f} | {rel['seconds'] / old['seconds']:16.2f} | "
                         f"{gib(old['peak_bytes'])}        | {diff:.1e}")
            print(line, flush=True)
    print("target: relevance peak <= plain peak + 2 x one layer's map (H N^2 x 4 B), at every depth")
    if failures:
        sys.exit("missed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
