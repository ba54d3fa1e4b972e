"""Train the project's own small Qwen2-VL-architecture model on the synthetic grid task.

    python -m explain_prune.synthetic_fit                    # reproduces explain_prune/assets/synthetic_model (12 layers)
    python -m explain_prune.synthetic_fit model=synthetic_4layer steps=2000 threads=1 training.streams.small.batch_size=32
    python -m explain_prune.synthetic_fit seed=1 out_dir=/tmp/m steps=600

The architecture is `conf/model/synthetic.yaml:tiny`; the random initial model is built by the
project's Qwen2-VL adapter from that block (pretrained=null), and every training batch is built with
the adapter's own prompt text and pixel functions, so the saved model is loaded and prompted by the
adapter unchanged.  Loss: cross-entropy on the answer word and the closing <|im_end|> only.

Curriculum: training starts with one object per image; the upper bound on objects grows by one
whenever the running training accuracy at the current bound reaches `curriculum.threshold`.  Larger
images (4x the visual tokens) join the batch cycle once the last level is reached.  Training data are
generated on the fly (seeds `seed + 7919 * k` for stream k); held-out samples come from streams
(`VAL_SEED`, `TEST_SEED`) that training never draws from.  Measured figures: docs/synthetic.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from explain_prune.core import InputError, Sample
from explain_prune.synthetic import register_resolvers
from explain_prune.synthetic.generator import SyntheticConfig, generate, synthetic_config

log = logging.getLogger("explain_prune.synthetic.fit")

VAL_SEED = 1_000_001  # validation stream used during training (curve)
TEST_SEED = 1_000_002  # held-out test stream (final report, tests/test_synthetic.py)
IGNORE = -100


# --- batching through the adapter --------------------------------------------------------------
def visual_span(vlm: Any, grid_thw: torch.Tensor, video: bool) -> str:
    """The placeholder text of one visual input, as the adapter's `prepare` writes it."""
    pad = "<|video_pad|>" if video else "<|image_pad|>"
    n = int(grid_thw.prod()) // vlm.merge**2
    return f"<|vision_start|>{pad * n}<|vision_end|>"


def encode_batch(vlm: Any, samples: Sequence[Sample], with_answer: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for a batch of single-image or video samples.

    Returns the HF forward kwargs plus `labels` (answer word + <|im_end|>, IGNORE elsewhere; aligned
    with the input positions, not shifted) and `answer_pos` (the position whose logits predict the
    first answer token = the last prompt token).
    """
    tok = vlm.tokenizer
    images = [s.images[0] for s in samples if s.video is None]
    videos = [s.video for s in samples if s.video is not None]
    if any(len(s.images) > 1 for s in samples if s.video is None):
        raise InputError("encode_batch: one image per sample")
    kwargs: dict[str, torch.Tensor] = {}
    image_grids: list[torch.Tensor] = []
    video_grids: list[torch.Tensor] = []
    if images:
        pixels, grid = vlm.image_pixels(images)
        kwargs["pixel_values"], kwargs["image_grid_thw"] = pixels, grid
        image_grids = list(grid)
    if videos:
        parts = [vlm.video_pixels(v) for v in videos]
        kwargs["pixel_values_videos"] = torch.cat([p for p, _ in parts])
        kwargs["video_grid_thw"] = torch.cat([g for _, g in parts])
        video_grids = [g[0] for _, g in parts]
    sequences, label_rows, answer_pos = [], [], []
    img_i = vid_i = 0
    for s in samples:
        if s.video is None:
            span = visual_span(vlm, image_grids[img_i], video=False)
            img_i += 1
        else:
            span = visual_span(vlm, video_grids[vid_i], video=True)
            vid_i += 1
        prompt = tok(vlm.prompt_text(s.question.strip(), span), add_special_tokens=False)["input_ids"]
        answer = tok(f"{s.answer}<|im_end|>", add_special_tokens=False)["input_ids"] if with_answer else []
        sequences.append(prompt + answer)
        label_rows.append([IGNORE] * len(prompt) + answer)
        answer_pos.append(len(prompt) - 1)
    length = max(len(x) for x in sequences)
    pad = vlm.pad_token_id
    input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(sequences, label_rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    mm = (input_ids == vlm.image_token_id).int() + 2 * (input_ids == vlm.video_token_id).int()
    kwargs.update(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm)
    kwargs["labels"] = labels
    kwargs["answer_pos"] = torch.tensor(answer_pos)
    return kwargs


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_pos")}
    return model(**inputs, use_cache=False).logits


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens (position p predicts token p + 1)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def first_token_correct(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] bool: greedy first answer token == the reference answer word."""
    rows = torch.arange(logits.shape[0])
    pred = logits[rows, batch["answer_pos"]].argmax(-1)
    return pred == batch["labels"][rows, batch["answer_pos"] + 1]


@torch.no_grad()
def predict(vlm: Any, samples: Sequence[Sample], batch_size: int = 32) -> list[int]:
    """The greedy first answer token of each sample (one batched teacher-forced forward; equals the
    first step of greedy decoding)."""
    was_training = vlm.model.training
    vlm.model.eval()
    out: list[int] = []
    for i in range(0, len(samples), batch_size):
        batch = encode_batch(vlm, samples[i : i + batch_size])
        batch = {k: v.to(vlm.device) for k, v in batch.items()}
        logits = forward_logits(vlm.model, batch)
        out += logits[torch.arange(logits.shape[0]), batch["answer_pos"]].argmax(-1).tolist()
    vlm.model.train(was_training)
    return out


def accuracy(vlm: Any, samples: Sequence[Sample], batch_size: int = 32) -> list[bool]:
    """Per-sample correctness of the greedy answer word."""
    preds = predict(vlm, samples, batch_size)
    return [vlm.tokenizer.convert_ids_to_tokens(p) == s.answer for p, s in zip(preds, samples)]


# --- curriculum and the training stream ------------------------------------------------------
@dataclass
class Curriculum:
    """Upper bound on objects per image, raised by one each time the running training accuracy at
    the current bound reaches `threshold` (over `window` samples, at least `min_steps` steps)."""

    start: int = field(metadata={"minimum": 1})
    stop: int = field(metadata={"minimum": 1})
    threshold: float = field(metadata={"minimum": 0.0, "maximum": 1.0})
    window: int = field(metadata={"minimum": 1})  # samples
    min_steps: int = field(default=50, metadata={"minimum": 0})
    current: int = field(init=False)
    history: list[dict[str, int]] = field(default_factory=list, init=False)
    _recent: deque = field(init=False, repr=False)
    _steps: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.current = self.start
        self._recent = deque(maxlen=self.window)

    def update(self, step: int, correct: Sequence[bool]) -> None:
        self._recent.extend(bool(c) for c in correct)
        self._steps += 1
        full = len(self._recent) == self._recent.maxlen and self._steps >= self.min_steps
        if self.current < self.stop and full and sum(self._recent) / len(self._recent) >= self.threshold:
            self.current += 1
            self._recent.clear()
            self._steps = 0
            self.history.append({"step": step, "max_objects": self.current})
            log.info("curriculum: step %d -> up to %d objects", step, self.current)

    @property
    def running_accuracy(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else float("nan")


@dataclass(frozen=True)
class Stream:
    config: SyntheticConfig
    batch_size: int = field(metadata={"minimum": 1})
    from_level: int = field(default=0, metadata={"minimum": 0})  # used once the curriculum's object bound reaches this level


class SyntheticStream(IterableDataset):
    """Batches of fresh samples.  Batch b comes from stream `cycle[b % len(cycle)]` (or from the
    first stream while that one waits for its curriculum level) and holds that stream's next
    `batch_size` indices.  Stream k draws from seed `seed + 7919 * k`, so streams never share
    scenes.  Object counts follow the curriculum: the first stream's bound is `curriculum.current`,
    the others scale it to their own maximum.  Single-process (the curriculum is updated by the
    training step in this process)."""

    def __init__(self, vlm: Any, streams: dict[str, Stream], cycle: Sequence[str], curriculum: Curriculum, seed: int):
        unknown = set(cycle) - set(streams)
        if not cycle or unknown:
            raise InputError(f"training.cycle must name streams in {sorted(streams)}, got {list(cycle)}")
        self.vlm, self.streams, self.cycle = vlm, streams, list(cycle)
        self.curriculum, self.seed = curriculum, seed
        self.names = list(streams)
        self.counts = {name: 0 for name in streams}  # batches drawn per stream (reported)

    def config_at(self, name: str) -> SyntheticConfig:
        cfg = self.streams[name].config
        ref = self.streams[self.names[0]].config.max_objects
        bound = min(cfg.max_objects, math.ceil(self.curriculum.current * cfg.max_objects / ref))
        return replace(cfg, max_objects=bound, min_objects=min(cfg.min_objects, bound))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        b = 0
        while True:
            name = self.cycle[b % len(self.cycle)]
            if self.curriculum.current < self.streams[name].from_level:
                name = self.names[0]
            batch_size = self.streams[name].batch_size
            seed = self.seed + 7919 * self.names.index(name)
            samples = generate(self.config_at(name), batch_size, seed=seed, start=self.counts[name] * batch_size)
            self.counts[name] += 1
            b += 1
            yield encode_batch(self.vlm, samples)


def _round_or_none(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


# --- Lightning ---------------------------------------------------------------------------------
def _lightning_module(vlm: Any, curriculum: Curriculum, lr: float, weight_decay: float, max_steps: int,
                      pct_start: float, val_samples: list[Sample], eval_every: int, curve: list[dict[str, Any]],
                      started: float):
    import lightning as L

    class FitModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = vlm.model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            logits = forward_logits(self.model, batch)
            loss = answer_loss(logits, batch["labels"])
            correct = first_token_correct(logits.detach(), batch)
            step = self.global_step + 1
            curriculum.update(step, correct.tolist())
            if step % eval_every == 0 or step == max_steps:
                acc = accuracy(vlm, val_samples)
                point = {
                    "step": step,
                    "seconds": round(time.time() - started, 1),
                    "loss": round(loss.item(), 4),
                    "train_running_acc": _round_or_none(curriculum.running_accuracy),
                    "max_objects": curriculum.current,
                    "val_acc": round(sum(acc) / len(acc), 4),
                    "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
                }
                curve.append(point)
                log.info("%s", json.dumps(point))
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, total_steps=max_steps, pct_start=pct_start, anneal_strategy="cos"
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return FitModule()



def evaluate_sets(vlm: Any, sets: dict[str, tuple[SyntheticConfig, int, int]], seed: int) -> dict[str, Any]:
    """Accuracy on each named held-out set (config, n, n_ablation), overall and by number of
    objects, and the token ablation (metrics.token_ablation) on its first n_ablation samples."""
    from explain_prune.synthetic.metrics import token_ablation

    report: dict[str, Any] = {}
    for name, (cfg, n, n_ablation) in sets.items():
        samples = generate(cfg, n, seed=seed)
        correct = accuracy(vlm, samples, batch_size=16 if cfg.frames or cfg.grid > 4 else 32)
        by_n: dict[int, list[bool]] = {}
        for s, c in zip(samples, correct):
            by_n.setdefault(len(s.meta["objects"]), []).append(c)
        report[name] = {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
            "n": n,
            "visual_tokens": cfg.num_visual_tokens,
            "accuracy": round(sum(correct) / n, 4),
            "by_num_objects": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(by_n.items())},
            "chance": samples[0].meta["chance"],
        }
        if n_ablation:
            report[name]["token_ablation"] = {"n": n_ablation, **token_ablation(vlm, samples[:n_ablation])}
        log.info("held-out %s: %s", name, json.dumps(report[name]))
    return report


def _publish(vlm: Any, report: dict[str, Any], out_dir: Path) -> None:
    """Write model, tokenizer and fit_report.json to a staging folder beside out_dir, then rename it into
    place: an interrupted fit never leaves a half-written model where the adapter would load it."""
    staging, previous = (out_dir.with_name(f".{out_dir.name}.{tag}") for tag in ("partial", "previous"))
    if previous.exists() and not out_dir.exists():  # an earlier swap stopped between its two renames
        os.replace(previous, out_dir)
    for stale in (staging, previous):
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir(parents=True)
    vlm.model.save_pretrained(staging)
    vlm.tokenizer.save_pretrained(staging)
    (staging / "fit_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if out_dir.exists():
        os.replace(out_dir, previous)  # a directory cannot be renamed onto a non-empty one
    os.replace(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)


def fit(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train, evaluate on held-out sets, then publish the model + tokenizer + fit_report.json to out_dir,
    or to `<out_dir>-below-target` when the first held-out set misses `target_accuracy`."""
    import lightning as L

    from explain_prune.models import build_vlm

    torch.set_num_threads(int(cfg.threads))
    started = time.time()
    load_start = os.getloadavg()
    L.seed_everything(int(cfg.seed), workers=False, verbose=False)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=False)
    model_cfg["pretrained"] = None  # the random initial model from the `tiny` block
    model_cfg["tiny"]["seed"] = int(cfg.seed)
    vlm = build_vlm(OmegaConf.create(model_cfg))
    vlm.model.train()
    n_params = sum(p.numel() for p in vlm.model.parameters())
    log.info("model: %.3f M parameters", n_params / 1e6)

    streams = {
        name: Stream(synthetic_config(node.config), int(node.batch_size), int(node.get("from_level", 0)))
        for name, node in cfg.training.streams.items()
    }
    cur = cfg.curriculum
    curriculum = Curriculum(int(cur.start), int(cur.stop), float(cur.threshold), int(cur.window), int(cur.min_steps))
    val_samples = generate(synthetic_config(cfg.training.val), int(cfg.training.val_n), seed=VAL_SEED)
    curve: list[dict[str, Any]] = []
    steps = int(cfg.steps)
    module = _lightning_module(vlm, curriculum, float(cfg.lr), float(cfg.weight_decay), steps,
                               float(cfg.pct_start), val_samples, int(cfg.eval_every), curve, started)
    stream = SyntheticStream(vlm, streams, list(cfg.training.cycle), curriculum, int(cfg.seed))
    loader = DataLoader(stream, batch_size=None, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=float(cfg.grad_clip),
        deterministic=True,
    )
    trainer.fit(module, train_dataloaders=loader)
    train_seconds = time.time() - started

    vlm.model.eval()
    sets = {
        name: (synthetic_config(node.config), int(node.n), int(node.get("ablation_n", 0)))
        for name, node in cfg.heldout.items()
    }
    heldout = evaluate_sets(vlm, sets, seed=TEST_SEED)
    target = float(cfg.target_accuracy)
    accepted = next(iter(heldout.values()))["accuracy"] >= target
    out_dir = Path(str(cfg.out_dir))
    if not accepted:  # the weights are kept for inspection, but never replace a model that met the target
        out_dir = out_dir.with_name(out_dir.name + "-below-target")
    report = {
        "command": " ".join(["python -m explain_prune.synthetic_fit", *overrides]),
        "seed": int(cfg.seed),
        "steps": steps,
        "lr": float(cfg.lr),
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "threads": int(cfg.threads),
        "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_start],
                                    "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "curriculum": curriculum.history,
        "batches_per_stream": stream.counts,
        "train": OmegaConf.to_container(cfg.training, resolve=True),
        "heldout_seed": TEST_SEED,
        "heldout": heldout,
        "target_accuracy": target,
        "accepted": accepted,
        "curve": curve,
    }
    _publish(vlm, report, out_dir)
    log.info("saved %s (%.1f s)", out_dir, report["wall_seconds"])
    return {**report, "out_dir": str(out_dir)}


register_resolvers()


if __name__ == "__main__":  # `python -m explain_prune.synthetic.fit` runs the stage `-m explain_prune.synthetic_fit`
    import runpy  # as __main__, so that Hydra finds conf/ from the stage's file wherever the package is

    runpy.run_module("explain_prune.synthetic_fit", run_name="__main__", alter_sys=True)
