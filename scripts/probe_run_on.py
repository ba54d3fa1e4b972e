"""Probe: why does the synthetic model run on past its answer word after input-stage pruning?

On held-out synthetic samples (the benchmark's seed), each condition prunes the visual tokens and the
model answers greedily (2 tokens, the benchmark's budget).  A sample "runs on" when its first word is
right but a second token follows instead of the end of the answer.  Each row gives the accuracy of
the first word, the run-on share among correct answers, and what the kept tokens hold: the share on
the queried object, on any object, and on background.

Part 1, the methods (one file each under explain_prune/methods): random and gae prune before layer 0
with the same count and the same kind of position gaps; FastV at layer 1 prunes after one full layer.
gae splits into its run-on and clean answers, so the kept content of the two can be compared.

Part 2, interventions before layer 0 that vary one candidate cause at a time:
  * positions: the same kept set with its original M-RoPE positions (gaps in the grid) or
    renumbered — every live token, text and visual, gets the next 1-D position on all three M-RoPE
    axes, as Qwen2-VL numbers text, so no gap is left;
  * content: every token of the queried object is kept, and the same number of other tokens is
    added, drawn either from the other objects only or from the background only (seeded per sample).

    python scripts/probe_run_on.py [--model synthetic] [--samples 300] [--retention 0.25]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from explain_prune.benchmarks.synthetic import BENCHMARK_SEED  # noqa: E402
from explain_prune.core.retention import keep_count  # noqa: E402
from explain_prune.engine import PrunePlan, generate  # noqa: E402
from explain_prune.methods import build_method  # noqa: E402
from explain_prune.models import build_vlm  # noqa: E402
from explain_prune.models.base import VisualPrompt  # noqa: E402
from explain_prune.synthetic.generator import SyntheticConfig, make_scene, scene_to_sample, token_positions  # noqa: E402

Row = tuple[bool, bool, float, float]  # (first word correct, runs on, kept share on target, on any object)


def method_kept(method, vlm, prompt: VisualPrompt) -> tuple[list[str], list[int]]:
    """The greedy 2-token answer's words under a method, and the visual tokens kept at its (only)
    pruning layer as input ordinals (`plan.info["kept"]`)."""
    plan = method.plan(vlm, prompt)
    words = generate(vlm, prompt, plan, max_new_tokens=2).text.split()
    kept = plan.info["kept"]
    return words, kept[max(kept)].tolist()


def renumbered(prompt: VisualPrompt, kept: list[int]) -> VisualPrompt:
    """The prompt with every token that survives keeping `kept` (visual input ordinals) numbered
    0, 1, 2, ... on all three M-RoPE axes; the dropped visual tokens' positions are never read."""
    live = torch.ones(prompt.length, dtype=torch.bool)
    live[prompt.visual_index.cpu()] = False
    live[prompt.visual_index.cpu()[kept]] = True
    compact = (live.long().cumsum(0) - 1).clamp(min=0).to(prompt.position_ids.device)  # [L]
    return dataclasses.replace(prompt, position_ids=compact.view(1, 1, -1).expand_as(prompt.position_ids).clone())


def answer_with(vlm, prompt: VisualPrompt, kept: list[int], renumber: bool) -> list[str]:
    """The greedy 2-token answer when exactly the visual ordinals `kept` enter layer 0."""
    chosen = sorted(kept)
    plan = PrunePlan(selectors={0: lambda view: view.visual_index[chosen]})
    source = renumbered(prompt, chosen) if renumber else prompt
    return generate(vlm, source, plan, max_new_tokens=2).text.split()


def draw(pool: list[int], n: int, generator: torch.Generator) -> list[int]:
    return [pool[i] for i in torch.randperm(len(pool), generator=generator)[:n].tolist()]


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
    interventions = ["gae's kept set, original positions", "gae's kept set, renumbered",
                     "target + other objects, original positions", "target + other objects, renumbered",
                     "target + background, original positions", "target + background, renumbered"]
    rows: dict[str, list[Row]] = {name: [] for name in [*methods, *interventions]}
    for index in range(args.samples):
        scene = make_scene(cfg, BENCHMARK_SEED, index)
        sample = scene_to_sample(scene, f"probe-{index}")
        prompt = vlm.prepare(sample)
        target = set(sample.meta["gt_tokens"])
        objects = {t for obj in scene.objects for t in token_positions(cfg, obj)}

        def record(name: str, words: list[str], kept: list[int]) -> None:
            correct = bool(words) and words[0] == sample.answer
            share = set(kept)
            rows[name].append((correct, correct and len(words) > 1, len(share & target) / len(share), len(share & objects) / len(share)))

        gae_kept: list[int] = []
        for name, method in methods.items():
            words, kept = method_kept(method, vlm, prompt)
            record(name, words, kept)
            gae_kept = kept if name.startswith("gae") else gae_kept
        # the fill count is shared by both contents, so only what is added differs
        background = sorted(set(range(prompt.num_visual)) - objects)
        others = sorted(objects - target)
        fill = min(keep_count(args.retention, prompt.num_visual, "round") - len(target), len(others), len(background))
        generator = torch.Generator().manual_seed(index)
        sets = {"gae's kept set": gae_kept,
                "target + other objects": sorted(target) + draw(others, fill, generator),
                "target + background": sorted(target) + draw(background, fill, generator)}
        for label, kept in sets.items():
            for renumber, suffix in ((False, "original positions"), (True, "renumbered")):
                record(f"{label}, {suffix}", answer_with(vlm, prompt, kept, renumber), kept)

    def summary(label: str, items: list[Row]) -> None:
        n = len(items)
        correct = [r for r in items if r[0]]
        run_on = sum(r[1] for r in items)
        target = sum(r[2] for r in items) / max(n, 1)
        objects = sum(r[3] for r in items) / max(n, 1)
        print(f"| {label} | {n} | {100 * len(correct) / max(n, 1):.1f} | {100 * run_on / max(len(correct), 1):.1f} | "
              f"{100 * target:.1f} | {100 * objects:.1f} | {100 * (1 - objects):.1f} |")

    header = ("| {} | samples | first word correct % | run-on % of correct | kept on target % | kept on any object % "
              "| kept on background % |\n|---|---|---|---|---|---|---|")
    print(f"model={args.model}, {args.samples} samples, retention {args.retention}")
    print(header.format("method"))
    for name in methods:
        summary(name, rows[name])
    gae = [r for r in rows["gae (layer 0)"] if r[0]]
    summary("gae, correct and running on", [r for r in gae if r[1]])
    summary("gae, correct and stopping", [r for r in gae if not r[1]])
    print()
    print(header.format("intervention before layer 0"))
    for name in interventions:
        summary(name, rows[name])


if __name__ == "__main__":
    main()
