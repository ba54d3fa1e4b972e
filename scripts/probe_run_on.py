"""Probe: why does the synthetic model run on past its answer word after input-stage pruning?

On held-out synthetic samples (the benchmark's seed), each method prunes and the model answers
greedily (2 tokens, the benchmark's budget).  A sample "runs on" when its first word is right but a
second token follows instead of the end of the answer.  For every method the probe prints the
accuracy of the first word, the run-on share among correct answers, and what the kept tokens hold:
the share on the queried object, on any object, and on background.  Methods (one file each under
explain_prune/methods): random and gae prune before layer 0, with the same count and the same kind of
position gaps; FastV at layer 1 prunes after one full layer.  gae splits into its run-on and clean
answers, so the kept content of the two can be compared within one method.

    python scripts/probe_run_on.py [--model synthetic] [--samples 300] [--retention 0.25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from explain_prune.benchmarks.synthetic import BENCHMARK_SEED  # noqa: E402
from explain_prune.engine import generate  # noqa: E402
from explain_prune.methods import build_method  # noqa: E402
from explain_prune.models import build_vlm  # noqa: E402
from explain_prune.synthetic.generator import SyntheticConfig, make_scene, scene_to_sample, token_positions  # noqa: E402


def answer_and_kept(method, vlm, prompt) -> tuple[list[str], set[int]]:
    """The greedy 2-token answer's words, and the visual tokens kept at the method's (only) pruning
    layer as input ordinals (`plan.info["kept"]`)."""
    plan = method.plan(vlm, prompt)
    words = generate(vlm, prompt, plan, max_new_tokens=2).text.split()
    kept = plan.info["kept"]
    return words, set(kept[max(kept)].tolist())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="synthetic")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--retention", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import explain_prune.synthetic  # noqa: F401  (registers the ${ep.asset:...} resolver)

    vlm = build_vlm(OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml"))
    cfg = SyntheticConfig(grid=4, cell_px=56, min_objects=2, max_objects=6)
    methods = {
        "random (layer 0)": build_method("random", args.retention),
        "gae (layer 0)": build_method("gae", args.retention, max_new_tokens=2),
        "fastv (layer 1)": build_method("fastv", args.retention, layer=1),
    }
    rows: dict[str, list[tuple[bool, bool, float, float]]] = {name: [] for name in methods}
    for index in range(args.samples):
        scene = make_scene(cfg, BENCHMARK_SEED, index)
        sample = scene_to_sample(scene, f"probe-{index}")
        prompt = vlm.prepare(sample)
        target = set(sample.meta["gt_tokens"])
        objects = {t for obj in scene.objects for t in token_positions(cfg, obj)}
        for name, method in methods.items():
            words, kept = answer_and_kept(method, vlm, prompt)
            correct = bool(words) and words[0] == sample.answer
            rows[name].append((correct, correct and len(words) > 1, len(kept & target) / len(kept), len(kept & objects) / len(kept)))

    def summary(label: str, items: list[tuple[bool, bool, float, float]]) -> None:
        n = len(items)
        correct = [r for r in items if r[0]]
        run_on = sum(r[1] for r in items)
        target = sum(r[2] for r in items) / max(n, 1)
        objects = sum(r[3] for r in items) / max(n, 1)
        print(f"| {label} | {n} | {100 * len(correct) / max(n, 1):.1f} | {100 * run_on / max(len(correct), 1):.1f} | "
              f"{100 * target:.1f} | {100 * objects:.1f} | {100 * (1 - objects):.1f} |")

    print(f"model={args.model}, {args.samples} samples, retention {args.retention}")
    print("| method | samples | first word correct % | run-on % of correct | kept on target % | kept on any object % | kept on background % |")
    print("|---|---|---|---|---|---|---|")
    for name, items in rows.items():
        summary(name, items)
    gae = [r for r in rows["gae (layer 0)"] if r[0]]
    summary("gae, correct and running on", [r for r in gae if r[1]])
    summary("gae, correct and stopping", [r for r in gae if not r[1]])


if __name__ == "__main__":
    main()
