"""Probe: does the layer-0 attention f_θ reads point at the queried object, or just at objects?

On held-out synthetic samples (the benchmark's seed), ranks the visual tokens by several layer-0
attention rows and prints, for the top k = |ground truth| tokens, the share that falls on the
queried object ("target") and on any object ("object"), next to the uniform reference:
  A_v^0            mean over instruction tokens and heads: the paper's f_θ input (§3.3)
  best token       the instruction token whose row (head mean) hits the target best, per sample (an
                   upper bound: it peeks at the ground truth to choose)
  last position    the last prompt token's row (head mean): FastV's query at layer 0
Rows come from `engine.attention.attention_rows`, the same code A_v^0 uses.

    python scripts/probe_first_layer_attention.py [--samples 500] [--grid 4 --max-objects 6]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from explain_prune.benchmarks.synthetic import BENCHMARK_SEED  # noqa: E402
from explain_prune.engine.attention import attention_rows  # noqa: E402
from explain_prune.models import build_vlm  # noqa: E402
from explain_prune.synthetic.generator import (  # noqa: E402
    SyntheticConfig,
    make_scene,
    scene_to_sample,
    token_positions,
)


def top_share(scores: torch.Tensor, k: int, tokens: set[int]) -> float:
    return len(tokens & set(torch.topk(scores, k).indices.tolist())) / k


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import explain_prune.synthetic  # noqa: F401  (registers the ${ep.asset:...} resolver)

    vlm = build_vlm(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "synthetic.yaml"))
    cfg = SyntheticConfig(grid=args.grid, cell_px=56, min_objects=args.min_objects, max_objects=args.max_objects)
    decoder = vlm.decoder
    shares: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for index in range(args.samples):
        scene = make_scene(cfg, BENCHMARK_SEED, index)
        sample = scene_to_sample(scene, f"probe-{index}")
        prompt = vlm.prepare(sample)
        positions = prompt.position_ids[:, 0] if prompt.position_ids.dim() == 3 else prompt.position_ids[0]
        last = torch.tensor([prompt.length - 1])
        queries = torch.cat([prompt.instruction_index, last])
        with torch.no_grad():
            rows = attention_rows(decoder.layers[0], decoder.rotary_emb, prompt.inputs_embeds[0], positions, queries)
        rows = rows[:, :, prompt.visual_index].mean(0)  # [Q, N_v], head mean
        target = set(sample.meta["gt_tokens"])
        objects = {t for obj in scene.objects for t in token_positions(cfg, obj)}
        k, n_obj = len(target), len(scene.objects)
        ranked = {
            "A_v^0 (f_θ input)": rows[:-1].mean(0),
            "best instruction token": max(rows[:-1], key=lambda r: top_share(r, k, target)),
            "last position (FastV query)": rows[-1],
        }
        for name, scores in ranked.items():
            shares[name + " target"][n_obj].append(top_share(scores, k, target))
            shares[name + " object"][n_obj].append(top_share(scores, k, objects))
        shares["uniform target"][n_obj].append(k / prompt.num_visual)
        shares["uniform object"][n_obj].append(len(objects) / prompt.num_visual)

    counts = sorted(shares["uniform target"])
    print(f"{args.samples} held-out samples (seed {BENCHMARK_SEED}), grid {args.grid}, "
          f"{args.min_objects}-{args.max_objects} objects; top-k share (%), k = |ground truth|")
    print(f"{'ranking':42s} {'all':>6s} " + " ".join(f"{f'{n} obj':>6s}" for n in counts))
    for name, by_count in shares.items():
        everything = [v for n in counts for v in by_count[n]]
        cells = " ".join(f"{100 * np.mean(by_count[n]):6.1f}" for n in counts)
        print(f"{name:42s} {100 * np.mean(everything):6.1f} {cells}")


if __name__ == "__main__":
    main()
