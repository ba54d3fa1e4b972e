"""What `python -m explain_prune.train` does, as plain functions of the composed config.

fit(cfg, cache_dirs): datamodule (validated before Lightning starts) -> CompressorModule -> Trainer.fit
  (resuming from cfg.ckpt_path) -> the best f_θ exported as <output_dir>/compressor.safetensors ->
  <output_dir>/results.json.
validate(cfg, cache_dirs, eval_dirs): a checkpoint's f_θ on the held-out split, or on other caches
  (e.g. longer sequences) -> the same metrics -> results.json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from explain_prune.compress.module import CompressorModule, ExportCompressor
from explain_prune.data.datamodule import RelevanceDataModule
from explain_prune.models.base import InputError

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def expect_meta(cfg: DictConfig, with_data: bool = True) -> dict[str, Any]:
    """The cache identity the selected config asks for."""
    return {
        "model": cfg.model.name,
        "data": cfg.data.name if with_data else None,
        "modality": cfg.modality.name,
    }


def build_datamodule(
    cfg: DictConfig, cache_dirs: Sequence[Any], eval_dirs: Sequence[Any] | None = None
) -> RelevanceDataModule:
    dm_cfg = _plain(cfg.datamodule)
    return RelevanceDataModule(
        cache_dirs=list(cache_dirs),
        # the primary cache must be the selected data; extra caches only need model + modality
        expect_meta=expect_meta(cfg, with_data=len(cache_dirs) == 1),
        eval_dirs=None if eval_dirs is None else list(eval_dirs),
        eval_expect_meta={"model": cfg.model.name},
        mask_ratio=float(cfg.compressor.mask_ratio),
        seed=int(cfg.seed),
        **dm_cfg,
    )


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            loggers.append(instantiate(node))
        else:
            log.debug("logger entry %s has no _target_, skipped", name)
    return loggers


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    return instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg) or False)


def _metrics_file(trainer: L.Trainer) -> str | None:
    for lg in trainer.loggers:
        if lg.__class__.__name__ == "CSVLogger" and lg.log_dir:
            return str(Path(lg.log_dir) / "metrics.csv")
    return None


def _write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    return path


def _threads(cfg: DictConfig) -> None:
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))


def _check_ckpt(path: Any) -> str | None:
    if path in (None, ""):
        return None
    if not Path(str(path)).is_file():
        raise InputError(f"checkpoint not found: {path}")
    return str(path)


def fit(cfg: DictConfig, cache_dirs: Sequence[Any], output_dir: str | Path) -> dict[str, Any]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = _check_ckpt(cfg.get("ckpt_path"))
    _threads(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg, cache_dirs)
    datamodule.setup("fit")  # bad caches fail here, before Lightning prints anything
    module = CompressorModule(
        ftheta=_plain(cfg.compressor.net),
        lr=float(cfg.compressor.lr),
        overlap_ratios=list(cfg.compressor.overlap_ratios),
        cache_meta=datamodule.cache_meta,
    )
    ck = cfg.checkpoint
    checkpoint = ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=ck.monitor,
        mode=ck.mode,
        save_top_k=int(ck.save_top_k),
        save_last=bool(ck.save_last),
    )
    export = ExportCompressor(str(output_dir / "compressor.safetensors"))
    trainer = build_trainer(cfg, output_dir, [checkpoint, export])
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    results = {
        "task": "train",
        "model": cfg.model.name,
        "data": cfg.data.name,
        "modality": cfg.modality.name,
        "cache_dirs": [str(d) for d in cache_dirs],
        "train_samples": len(datamodule.train_set or []),
        "val_samples": len(datamodule.val_set or []),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "seconds": round(time.time() - start, 2),
        "metrics": dict(module.last_val),
        "baselines": dict(module.baselines),
        "best_checkpoint": checkpoint.best_model_path or None,
        "best_score": None if checkpoint.best_model_score is None else float(checkpoint.best_model_score),
        "last_checkpoint": checkpoint.last_model_path or None,
        "compressor": export.exported,
        "metrics_csv": _metrics_file(trainer),
        "resumed_from": ckpt_path,
        "config": _plain(cfg.compressor),
    }
    results["results_json"] = str(_write_results(output_dir, results))
    return results


def validate(
    cfg: DictConfig, cache_dirs: Sequence[Any], output_dir: str | Path, eval_dirs: Sequence[Any] | None = None
) -> dict[str, Any]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = _check_ckpt(cfg.get("ckpt_path"))
    if ckpt_path is None:
        raise InputError("validate_only=true needs ckpt_path=<a .ckpt written by explain_prune.train>")
    _threads(cfg)
    try:
        module = CompressorModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except (KeyError, RuntimeError, TypeError) as err:
        raise InputError(f"not a compressor checkpoint: {ckpt_path} ({str(err).splitlines()[0]})") from None
    trained_model = (module.hparams.get("cache_meta") or {}).get("model")
    if trained_model and trained_model != cfg.model.name:
        raise InputError(
            f"checkpoint {ckpt_path} was trained on model={trained_model!r}, but model={cfg.model.name!r} is selected"
        )
    datamodule = build_datamodule(cfg, cache_dirs, eval_dirs=eval_dirs)
    datamodule.setup("validate")
    trainer = build_trainer(cfg, output_dir, [])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    results = {
        "task": "validate",
        "model": cfg.model.name,
        "checkpoint": ckpt_path,
        "eval_dirs": None if eval_dirs is None else [str(d) for d in eval_dirs],
        "cache_dirs": None if eval_dirs is not None else [str(d) for d in cache_dirs],
        "val_samples": len(datamodule.val_set or []),
        "val_lengths": [min(datamodule.val_set.lengths), max(datamodule.val_set.lengths)]
        if datamodule.val_set
        else None,
        "metrics": dict(module.last_val),
        "baselines": dict(module.baselines),
        "metrics_csv": _metrics_file(trainer),
    }
    results["results_json"] = str(_write_results(output_dir, results))
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """What the entry point prints at the end: metrics, then where everything is."""
    lines = []
    metrics = {**results.get("metrics", {}), **results.get("baselines", {})}
    if metrics:
        lines.append("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    for key in ("best_checkpoint", "last_checkpoint", "compressor", "metrics_csv", "results_json"):
        if results.get(key):
            lines.append(f"{key.replace('_', ' ')}: {results[key]}")
    return lines


__all__ = ["fit", "validate", "build_datamodule", "build_trainer", "expect_meta", "summary_lines"]

