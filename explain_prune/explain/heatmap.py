"""Relevance heat-maps over the input (paper Fig. 2 / App. A), for `python -m explain_prune.visualize`.

Each visual token's score is painted into the region of the image / frame it reads
(`VLM.visual_token_boxes`); the kept-token panels show the tokens a layer-0 top-k selection keeps, as
the `gae` (by R_v) and `ours` (by f_θ's R̃_v) methods select them, with the answer the model gives
from those tokens only.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from explain_prune.core import Sample
from explain_prune.engine import generate
from explain_prune.engine.plan import PrunePlan, TokenView
from explain_prune.methods.base import tracked
from explain_prune.models.base import VLM, VisualPrompt
from explain_prune.synthetic.generator import TEMPORAL_PATCH

VIEW_NAMES = {0: "thumbnail", 1: "anyres crops"}  # names when a picture has several views (LLaVA-OneVision)
DIM = 0.8  # weight of white over a dropped token's pixels ("masked in white", Fig. 2)
GT_COLOR = "lime"


@dataclass
class Scored:
    """One scorer's view of a sample: scores [N_v], and per retention the kept ordinals and answer."""

    name: str
    scores: torch.Tensor
    kept: dict[float, torch.Tensor] = field(default_factory=dict)
    answers: dict[float, str] = field(default_factory=dict)


@dataclass
class Explanation:
    sample: Sample
    pictures: list[Image.Image]  # the images / frames the model saw, in the order boxes index them
    boxes: torch.Tensor  # [N_v, 7] VLM.visual_token_boxes
    answer: str  # the unpruned greedy answer R_v explains
    scorers: list[Scored]
    gt: torch.Tensor | None  # [G, 7] the synthetic ground truth's regions (same columns), if known
    model: str  # the model config name

    @property
    def panels(self) -> list[tuple[int, int]]:
        """(picture, view) pairs that some token reads, in picture order."""
        pairs = set()
        for first, stop, view in self.boxes[:, :3].long().tolist():
            pairs.update((i, view) for i in range(max(first, 0), min(stop, len(self.pictures))))
        return sorted(pairs)


# --- geometry -----------------------------------------------------------------------------------
def _pixel_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Pixels [a, b) of an n-pixel side whose centres (i + 0.5) / n lie in [lo, hi)."""
    a = int(np.ceil(round(lo * n - 0.5, 9)))
    b = int(np.ceil(round(hi * n - 0.5, 9)))
    return max(a, 0), min(max(b, 0), n)


def owner_map(boxes: torch.Tensor, index: int, view: int, height: int, width: int) -> np.ndarray:
    """[H, W] int64: the ordinal of the token of (picture `index`, `view`) whose box holds each pixel
    centre, -1 where none does.  Boxes of one view never overlap (a RuntimeError if they do)."""
    owner = np.full((height, width), -1, dtype=np.int64)
    rows = ((boxes[:, 0] <= index) & (index < boxes[:, 1]) & (boxes[:, 2] == view)).nonzero().flatten().tolist()
    for token in rows:
        _, _, _, x0, y0, x1, y1 = boxes[token].tolist()
        (ya, yb), (xa, xb) = _pixel_span(y0, y1, height), _pixel_span(x0, x1, width)
        region = owner[ya:yb, xa:xb]
        if (region >= 0).any():
            raise RuntimeError(f"visual tokens {token} and {int(region.max())} overlap in picture {index}, view {view}")
        region[...] = token
    return owner


def raster(values: torch.Tensor, owner: np.ndarray) -> np.ndarray:
    """[H, W] float64: each pixel holds the value of the token that reads it, NaN where none does."""
    values = values.double().cpu().numpy()
    out = np.full(owner.shape, np.nan)
    read = owner >= 0
    out[read] = values[owner[read]]
    return out


def gt_boxes(sample: Sample) -> torch.Tensor | None:
    """The synthetic task's ground-truth tokens as regions ([G, 7], visual_token_boxes columns): cells
    of its (t, h, w) grid of 28-px tokens, t = pairs of frames for a video (synthetic/generator.py)."""
    if "gt_tokens" not in sample.meta:
        return None
    t, h, w = (int(v) for v in sample.meta["visual_grid"])
    per_t = TEMPORAL_PATCH if sample.video is not None else 1
    edges_y = torch.linspace(0, 1, h + 1, dtype=torch.float64).unfold(0, 2, 1)
    edges_x = torch.linspace(0, 1, w + 1, dtype=torch.float64).unfold(0, 2, 1)
    grid = torch.cat([VLM.grid_token_boxes(k * per_t, (k + 1) * per_t, 0, edges_y, edges_x) for k in range(t)])
    return grid[torch.as_tensor(sample.meta["gt_tokens"], dtype=torch.long)]


# --- scores and kept tokens ---------------------------------------------------------------------
def keep(vlm: VLM, prompt: VisualPrompt, scores: torch.Tensor, retention: float, max_new_tokens: int) -> tuple[torch.Tensor, str]:
    """(kept visual-token ordinals [k] ascending, the answer from those tokens only): the layer-0 top-k
    selection of the gae / ours methods (TokenView.keep_top, k = max(1, round(r * N_v)))."""
    plan = PrunePlan(info={"method": "visualize"})

    def select(view: TokenView) -> torch.Tensor:
        return view.keep_top(scores.to(view.hidden.device), view.budget(retention))

    plan.selectors[0] = tracked(plan, 0, select)
    answer = generate(vlm, prompt, plan, max_new_tokens=max_new_tokens)
    return plan.info["kept"][0].sort().values, answer.text


def explain(
    vlm: VLM,
    sample: Sample,
    pictures: Sequence[Image.Image],
    gae: Any,
    ours: Any | None,
    retentions: Sequence[float],
) -> Explanation:
    """R_v as the `gae` method computes it, f_θ's R̃_v as the `ours` method does (when given), and
    each one's kept tokens and pruned answer at every retention."""
    prompt = vlm.prepare(sample)
    boxes = vlm.visual_token_boxes(prompt, image_sizes=[(p.height, p.width) for p in pictures])
    rv, answer_ids = gae.scores(vlm, prompt)
    name = "R_v" if gae.options["head_reduce"] == "grad" else "R_v (head mean)"
    scorers = [Scored(name, rv.float().cpu())]
    if ours is not None:
        scorers.append(Scored("f_θ", ours.predict(vlm, prompt)[1].float().cpu()))
    max_new = int(gae.options["max_new_tokens"])
    for scorer in scorers:
        for r in retentions:
            scorer.kept[r], scorer.answers[r] = keep(vlm, prompt, scorer.scores, r, max_new)
    return Explanation(sample, list(pictures), boxes, vlm.decode(answer_ids), scorers, gt_boxes(sample), vlm.name)


# --- the figure ---------------------------------------------------------------------------------
def _kept_picture(picture: np.ndarray, owner: np.ndarray, kept: torch.Tensor) -> np.ndarray:
    """The picture with every pixel not read by a kept token blended towards white."""
    shown = np.isin(owner, kept.numpy())
    out = picture.astype(np.float64)
    out[~shown] = (1 - DIM) * out[~shown] + DIM * 255
    return out.astype(np.uint8)


def _gt_mask(gt: torch.Tensor, index: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    for first, stop, _, x0, y0, x1, y1 in gt.tolist():
        if first <= index < stop:
            (ya, yb), (xa, xb) = _pixel_span(y0, y1, height), _pixel_span(x0, x1, width)
            mask[ya:yb, xa:xb] = True
    return mask


def _short(text: str, limit: int = 28) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def figure(exp: Explanation, retentions: Sequence[float], cell_inches: float = 2.6):
    """Fig. 2 / App. A layout: the input, then per scorer its heat-map and its kept tokens at each
    retention, as columns; one row per image (per view, for LLaVA-OneVision's thumbnail + crops).
    A video turns it around: one row of frames per panel kind."""
    from matplotlib.figure import Figure

    kinds: list[tuple[Scored | None, float | None]] = [(None, None)]
    for scorer in exp.scorers:
        kinds += [(scorer, None)] + [(scorer, r) for r in retentions]
    panels = exp.panels
    video = exp.sample.video is not None
    views = {i: sum(1 for j, _ in panels if j == i) for i, _ in panels}
    n_rows, n_cols = (len(kinds), len(panels)) if video else (len(panels), len(kinds))
    fig = Figure(figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.9), layout="constrained")
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    n_visual = len(exp.boxes)
    for p, (index, view) in enumerate(panels):
        picture = np.asarray(exp.pictures[index].convert("RGB"))
        height, width = picture.shape[:2]
        owner = owner_map(exp.boxes, index, view, height, width)
        gt = _gt_mask(exp.gt, index, height, width) if exp.gt is not None else None
        where = f"{'frame' if video else 'image'} {index + 1}"
        if views[index] > 1:
            where += f" · {VIEW_NAMES.get(view, f'view {view}')}"
        for k, (scorer, r) in enumerate(kinds):
            row, col = (k, p) if video else (p, k)
            ax = axes[row, col]
            if scorer is not None and r is not None:
                ax.imshow(_kept_picture(picture, owner, scorer.kept[r]))
                label = f"{scorer.name} top-{r:.0%} ({len(scorer.kept[r])}/{n_visual})\n→ {_short(scorer.answers[r])!r}"
            else:
                ax.imshow(picture)
                label = "input" if scorer is None else f"{scorer.name} heat-map"
                if scorer is not None:
                    heat = raster(scorer.scores, owner)
                    top = float(scorer.scores.max()) or 1.0
                    ax.imshow(np.ma.masked_invalid(heat), cmap="jet", alpha=0.55, vmin=0.0, vmax=top)
            if gt is not None and gt.any():
                ax.contour(gt.astype(float), levels=[0.5], colors=GT_COLOR, linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            across, down = (where, label) if video else (label, where)
            if row == 0:
                ax.set_title(across, fontsize=9)
            if col == 0 and (video or len(panels) > 1):
                ax.set_ylabel(down, fontsize=9)
    reference = f"  (reference: {exp.sample.answer})" if exp.sample.answer else ""
    gt_note = f"  · ground-truth object outlined in {GT_COLOR}" if exp.gt is not None else ""
    width = max(60, int(40 * n_cols))
    question = textwrap.shorten(" ".join(exp.sample.question.split()), width)
    answer = textwrap.shorten(exp.answer, width // 2)
    fig.suptitle(f"{exp.model} · {exp.sample.id}\nQ: {question}   A: {answer}{reference}{gt_note}", fontsize=10)
    return fig


def save_png(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write the figure atomically (temp name in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def record(exp: Explanation) -> dict[str, Any]:
    """What the figure shows, as JSON (written next to the PNG)."""
    return {
        "model": exp.model,
        "sample_id": exp.sample.id,
        "question": exp.sample.question,
        "reference": exp.sample.answer,
        "answer": exp.answer,
        "num_visual": len(exp.boxes),
        "gt_tokens": exp.sample.meta.get("gt_tokens"),
        "scorers": {
            s.name: {
                "scores": s.scores.tolist(),
                "kept": {str(r): s.kept[r].tolist() for r in s.kept},
                "answers": {str(r): s.answers[r] for r in s.answers},
            }
            for s in exp.scorers
        },
    }
