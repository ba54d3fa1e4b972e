"""LightningModule training f_θ with the masked KL(R_v* ‖ R̃_v) of Eq. 3.

Validation metrics (all sum-state torchmetrics, so they reduce correctly under DDP):

- `val/kl`: mean over samples of Σ_i R*_i (log R*_i − log R̃_i) over the sample's tokens.
- `val/recall@P` for P in `overlap_ratios` (default 10 / 25 / 50 %): with k = max(1, round(P/100·N_v)),
  |top-k(R̃_v) ∩ top-k(R_v)| / k, averaged over samples.  Top-k of R_v is exactly the keep set of the
  GAE oracle at retention P % (docs/design.md §Keep-count rule: k = max(1, round(r·N_v))) and top-k of R̃_v is f_θ's keep set,
  so this one number is both "recall of R_v's top-k" and "keep-set overlap with the GAE oracle at
  retention P %"; it is logged once under this name.  (For P ≤ 50 the top-k of R_v* is the same set.)
- Baselines, computed on the whole validation set at the first validation epoch and logged/printed
  once: `val/baseline/uniform_kl` (R̃ = 1/N_v), `val/baseline/a0_kl` (R̃ = A_v^0 / Σ A_v^0, i.e. the
  raw first-layer attention as the prediction, floored at 1e-12), and `val/baseline/a0_recall@P`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torchmetrics import Metric

from explain_prune.compress.labels import topk_mask
from explain_prune.compress.network import COMPRESSORS, build_compressor, save_compressor

log = logging.getLogger(__name__)
A0_FLOOR = 1e-12


def masked_kl(label: torch.Tensor, log_pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(label ‖ pred) [B]: Σ over mask & label>0 of t (log t − log p); no 0·(−inf)."""
    use = mask & (label > 0)
    t = torch.where(use, label, torch.ones_like(label))
    lp = torch.where(use, log_pred, torch.zeros_like(log_pred))
    return torch.where(use, t * (torch.log(t) - lp), torch.zeros_like(label)).sum(-1)


class MeanPerSample(Metric):
    """Mean of a per-sample quantity (sum / count states)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.detach().to(torch.float64).sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).to(torch.float32)


class KeepSetOverlap(Metric):
    """|top-k(pred) ∩ top-k(target)| / k with k = max(1, round(ratio·N)), mean over samples."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ratio: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.ratio = float(ratio)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        keep_pred = topk_mask(pred, mask, self.ratio)
        keep_true = topk_mask(target, mask, self.ratio)
        k = keep_true.sum(-1).clamp(min=1)
        self.total += ((keep_pred & keep_true).sum(-1).to(torch.float64) / k).sum()
        self.count += pred.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).to(torch.float32)


def _pct(ratio: float) -> str:
    return f"{round(ratio * 100):d}"


class CompressorModule(L.LightningModule):
    """A compressor (f_θ by default) + Adam + the metrics above.  `ftheta` is its config dict and
    `compressor` its registry name, both stored in the checkpoint's hyper-parameters, so
    `load_from_checkpoint` and `ExportCompressor` rebuild the network."""

    def __init__(
        self,
        ftheta: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        overlap_ratios: Sequence[float] = (0.1, 0.25, 0.5),
        cache_meta: Mapping[str, Any] | None = None,
        compressor: str = "ftheta",
    ):
        super().__init__()
        config = COMPRESSORS.get(compressor).config_class.from_dict(dict(ftheta or {}))
        self.save_hyperparameters(
            {
                "compressor": str(compressor),
                "ftheta": config.to_dict(),
                "lr": float(lr),
                "overlap_ratios": [float(r) for r in overlap_ratios],
                "cache_meta": dict(cache_meta or {}),
            }
        )
        self.net = build_compressor(compressor, config.to_dict())
        self.ratios = [float(r) for r in overlap_ratios]
        self.train_kl = MeanPerSample()
        self.val_kl = MeanPerSample()
        self.val_overlap = torch.nn.ModuleDict({_pct(r): KeepSetOverlap(r) for r in self.ratios})
        self.base_uniform_kl = MeanPerSample()
        self.base_a0_kl = MeanPerSample()
        self.base_a0_overlap = torch.nn.ModuleDict({_pct(r): KeepSetOverlap(r) for r in self.ratios})
        self.baselines: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x, mask)

    def _kl(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        log_pred = self.net.log_prob(batch["x"], batch["mask"])
        return masked_kl(batch["label"], log_pred, batch["mask"]), log_pred

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        kl, _ = self._kl(batch)
        loss = kl.mean()
        self.train_kl(kl)
        bs = int(batch["a0"].shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/kl", self.train_kl, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _baselines_pending(self) -> bool:
        return not self.baselines and not self.trainer.sanity_checking

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        kl, log_pred = self._kl(batch)
        mask, label, rv = batch["mask"], batch["label"], batch["rv"]
        bs = int(mask.shape[0])
        self.val_kl(kl)
        self.log("val/kl", self.val_kl, prog_bar=True, batch_size=bs)
        for key, metric in self.val_overlap.items():
            metric(log_pred, rv, mask)
            self.log(f"val/recall@{key}", metric, batch_size=bs)
        if self._baselines_pending():
            n = mask.sum(-1, keepdim=True).to(torch.float32)
            uniform = torch.where(mask, -torch.log(n).expand_as(label), torch.zeros_like(label))
            self.base_uniform_kl.update(masked_kl(label, uniform, mask))
            a0 = torch.where(mask, batch["a0"].clamp(min=0.0), torch.zeros_like(label))
            a0 = a0 / a0.sum(-1, keepdim=True).clamp(min=A0_FLOOR)
            self.base_a0_kl.update(masked_kl(label, torch.log(a0.clamp(min=A0_FLOOR)), mask))
            for key, metric in self.base_a0_overlap.items():
                metric.update(batch["a0"], rv, mask)

    def on_validation_epoch_end(self) -> None:
        if self._baselines_pending() and int(self.base_uniform_kl.count) > 0:
            values = {
                "val/baseline/uniform_kl": float(self.base_uniform_kl.compute()),
                "val/baseline/a0_kl": float(self.base_a0_kl.compute()),
            }
            for key, metric in self.base_a0_overlap.items():
                values[f"val/baseline/a0_recall@{key}"] = float(metric.compute())
            self.baselines = values
            self.log_dict(values, sync_dist=False)
            if self.trainer.is_global_zero:
                print(
                    "baselines on the validation set: "
                    + ", ".join(f"{k.removeprefix('val/baseline/')}={v:.4f}" for k, v in values.items()),
                    flush=True,
                )

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_val = {
                k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")
            }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class ExportCompressor(L.Callback):
    """At the end of fit, write the best checkpoint's f_θ with `save_compressor` (safetensors + config)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.exported: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        net = build_compressor(pl_module.hparams.get("compressor", "ftheta"), pl_module.hparams["ftheta"])
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
        else:
            net.load_state_dict(pl_module.net.state_dict())
        save_compressor(self.path, net)
        self.exported = self.path


__all__ = ["CompressorModule", "ExportCompressor", "masked_kl", "KeepSetOverlap", "MeanPerSample"]
