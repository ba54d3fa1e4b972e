"""Checks that the ground-truth tokens are what a model's answer depends on.

`token_ablation` answers each sample with visual tokens removed at the input of the language model
(the remaining tokens keep their original M-RoPE positions, as input-stage pruning does):
  full          no token removed
  drop_gt       the ground-truth tokens removed           -> should fall to chance
  drop_random   as many random non-ground-truth tokens removed -> should stay at `full`
  keep_gt_only  every visual token except the ground truth removed -> should stay at `full`
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from explain_prune.core import Sample

CONDITIONS = ("full", "drop_gt", "drop_random", "keep_gt_only")


@torch.no_grad()
def answer_without(vlm: Any, prompt: Any, drop: torch.Tensor) -> int:
    """Greedy first answer token when the visual tokens `drop` (indices into the visual sequence)
    are removed from the prompt."""
    keep = torch.ones(prompt.length, dtype=torch.bool)
    keep[prompt.visual_index[drop]] = False
    keep = keep.to(prompt.inputs_embeds.device)
    logits = vlm.model(
        inputs_embeds=prompt.inputs_embeds[:, keep],
        position_ids=prompt.position_ids[..., keep],
        attention_mask=prompt.attention_mask[:, keep],
    ).logits
    return int(logits[0, -1].argmax())


def token_ablation(vlm: Any, samples: Sequence[Sample], seed: int = 0) -> dict[str, float]:
    """Accuracy of the greedy answer word under each condition of `CONDITIONS`."""
    rng = np.random.default_rng(seed)
    hits = {c: 0 for c in CONDITIONS}
    was_training = vlm.model.training
    vlm.model.eval()
    for s in samples:
        prompt = vlm.prepare(s)
        gt = np.asarray(s.meta["gt_tokens"], dtype=np.int64)
        others = np.setdiff1d(np.arange(prompt.num_visual), gt)
        drops = {
            "full": np.zeros(0, dtype=np.int64),
            "drop_gt": gt,
            "drop_random": rng.choice(others, size=min(len(gt), len(others)), replace=False),
            "keep_gt_only": others,
        }
        for cond, drop in drops.items():
            token = answer_without(vlm, prompt, torch.from_numpy(np.sort(drop)))
            hits[cond] += vlm.tokenizer.convert_ids_to_tokens(token) == s.answer
    vlm.model.train(was_training)
    return {c: round(hits[c] / len(samples), 4) for c in CONDITIONS}
