"""What `python -m explain_prune.train` does, as plain functions of the composed config.

run(cfg, output_dir): cfg.ckpt_path read and checked (`read_checkpoint`, weights_only), the cache
  ensured (built when `data.auto_generate`), then fit or validate.

fit(cfg, cache_dirs, output_dir, checkpoint): caches opened and verified -> datamodule ->
  CompressorModule -> Trainer.fit (resuming from the checkpoint) -> the best f_θ exported as
  <output_dir>/compressor.safetensors -> <output_dir>/results.json.
validate(cfg, cache_dirs, output_dir, checkpoint, eval_dirs): a checkpoint's f_θ on the held-out split, or on
  other caches (e.g. longer sequences) -> the same metrics -> results.json.

The caches are opened (and every bad input reported) before Lightning is imported, so a wrong
command fails in about a second with one line.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from explain_prune.cli import set_torch_threads
from explain_prune.compress.network import COMPRESSORS
from explain_prune.core import RESULTS, InputError, write_json_atomic
from explain_prune.data.cache import CacheReader

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L

    from explain_prune.compress.datamodule import RelevanceDataModule

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def expect_meta(cfg: DictConfig, with_data: bool = True) -> dict[str, Any]:
    """The cache identity the selected config asks for."""
    return {
        "model": cfg.model.name,
        "data": cfg.data.name if with_data else None,
        "modality": cfg.modality.name,
    }


def open_caches(
    dirs: Sequence[Any],
    expect: dict[str, Any],
    first_expect: dict[str, Any] | None = None,
    inputs: Sequence[str] = ("a0",),
) -> list[CacheReader]:
    """One verified CacheReader per entry (a directory, or a list of part-directories), holding the
    per-token features the compressor's `inputs` need beyond A_v^0."""
    features = [name for name in inputs if name != "a0"]
    readers = []
    for i, entry in enumerate(dirs):
        want = first_expect if (i == 0 and first_expect is not None) else expect
        readers.append(CacheReader(list(entry) if isinstance(entry, (list, tuple)) else entry, want, features=features))
    return readers


def compressor_inputs(net: Mapping[str, Any]) -> list[str]:
    """The features a compressor config reads (its `inputs`, the paper's ["a0"] when unset)."""
    return list(net.get("inputs") or ["a0"])


def cache_in_channels(caches: Sequence[CacheReader], inputs: Sequence[str]) -> int:
    """The total width of `inputs` in the caches: 1 for A_v^0, a0_heads one per attention head."""
    widths = {sum(1 if name == "a0" else int(s.features[name].shape[1]) for name in inputs) for reader in caches for s in reader}
    if len(widths) != 1:
        raise InputError(f"the caches' features {list(inputs)} have different widths {sorted(widths)}: one model per f_θ")
    return widths.pop()


def cache_a0_query(caches: Sequence[CacheReader]) -> str:
    """The A_v^0 query rows the caches were built with (meta config.relevance.a0_query; caches from
    before the option are "instruction"); caches that disagree cannot train one f_θ."""
    queries = {}
    for reader in caches:
        relevance = ((reader.meta.get("config") or {}).get("relevance") or {})
        queries.setdefault(relevance.get("a0_query", "instruction"), str(reader))
    if len(queries) > 1:
        found = ", ".join(f"{q} ({where})" for q, where in queries.items())
        raise InputError(f"caches were built with different relevance.a0_query: {found}")
    return next(iter(queries), "instruction")


def _ftheta_config(cfg: DictConfig, caches: Sequence[CacheReader]) -> dict[str, Any]:
    """compressor.net plus the caches' a0_query (which an explicit compressor.net.a0_query must
    match) and the width of its inputs there."""
    net = _plain(cfg.compressor.net)
    a0_query = cache_a0_query(caches)
    if net.get("a0_query", a0_query) != a0_query:
        raise InputError(
            f"compressor.net.a0_query={net['a0_query']!r} but the caches hold A_v^0 of a0_query={a0_query!r}"
        )
    inputs = compressor_inputs(net)
    return {**net, "a0_query": a0_query, "inputs": inputs, "in_channels": cache_in_channels(caches, inputs)}


def _number(cfg: DictConfig, key: str, positive: bool = True) -> float:
    value = OmegaConf.select(cfg, key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{key} must be a number, got {value!r}") from None
    if positive and not number > 0:
        raise InputError(f"{key} must be > 0, got {value!r}")
    return number


def build_datamodule(
    cfg: DictConfig, caches: Sequence[Any], eval_caches: Sequence[Any] | None = None, inputs: Sequence[str] = ("a0",)
) -> "RelevanceDataModule":
    from explain_prune.compress.datamodule import RelevanceDataModule

    return RelevanceDataModule(
        cache_dirs=list(caches),
        expect_meta=expect_meta(cfg, with_data=False),
        eval_dirs=None if eval_caches is None else list(eval_caches),
        eval_expect_meta={"model": cfg.model.name},
        mask_ratio=_number(cfg, "compressor.mask_ratio", positive=False),
        seed=int(cfg.seed),
        inputs=inputs,
        **_plain(cfg.datamodule),
    )


def build_loggers(cfg: DictConfig) -> list[Any]:
    from hydra.utils import instantiate

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            if node._target_.endswith("CSVLogger"):
                node = _csv_beside_earlier(node)
            loggers.append(instantiate(node))
        else:
            log.debug("logger entry %s has no _target_, skipped", name)
    return loggers


CSV_METRICS = "metrics.csv"


def _csv_beside_earlier(node: DictConfig) -> DictConfig:
    """A run resumed in the same output dir would make Lightning rewrite metrics.csv from the resume
    epoch on, dropping what was logged after that epoch; it writes `<name>/resume<k>/metrics.csv`
    beside the earlier files instead (results.json lists them all)."""
    root = Path(str(node.save_dir)) / str(node.name)
    version = node.get("version")
    if not (root / ("" if version in (None, "") else str(version)) / CSV_METRICS).is_file():
        return node
    k = 1
    while (root / f"resume{k}" / CSV_METRICS).is_file():
        k += 1
    return OmegaConf.merge(node, {"version": f"resume{k}"})


def _metrics_history(metrics_csv: str | None) -> list[str]:
    """Every metrics.csv this output dir holds, oldest first: the first run's, then each resume's."""
    if metrics_csv is None:
        return []
    current = Path(metrics_csv)
    root = current.parent.parent if current.parent.name.startswith("resume") else current.parent
    files = [root / CSV_METRICS] if (root / CSV_METRICS).is_file() else []
    files += sorted(root.glob(f"resume*/{CSV_METRICS}"), key=lambda f: int(f.parent.name.removeprefix("resume") or 0))
    return [str(f) for f in files]


def build_trainer(cfg: DictConfig, callbacks: list[Any]) -> "L.Trainer":
    from hydra.utils import instantiate

    return instantiate(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg) or False)


def _metrics_file(trainer: Any) -> str | None:
    for lg in trainer.loggers:
        if lg.__class__.__name__ == "CSVLogger" and lg.log_dir:
            return str(Path(lg.log_dir) / "metrics.csv")
    return None


def _write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    path = output_dir / RESULTS
    write_json_atomic(path, results)
    return path


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed or validated run needs to know of a Lightning checkpoint before it starts."""

    path: str
    epoch: int  # the epoch it was saved in (0-based, Lightning's current_epoch)
    hparams: dict[str, Any]  # CompressorModule's: ftheta (the network), cache_meta, lr, ...

    def check_against(self, cfg: DictConfig, caches: Sequence[CacheReader], ftheta: dict[str, Any] | None = None) -> None:
        """The checkpoint must have been trained for this model, on A_v^0 of the caches' query, and
        (when resuming) with this run's f_θ architecture: anything else would silently train or
        export the wrong network."""
        trained_model = (self.hparams.get("cache_meta") or {}).get("model")
        if trained_model and trained_model != cfg.model.name:
            raise InputError(
                f"checkpoint {self.path} was trained on model={trained_model!r}, but model={cfg.model.name!r} is selected"
            )
        trained = self.hparams.get("ftheta") or {}
        trained_query, held_query = trained.get("a0_query", "instruction"), cache_a0_query(caches)
        if held_query != trained_query:
            raise InputError(
                f"checkpoint {self.path} reads A_v^0 of a0_query={trained_query!r}, but the caches hold a0_query={held_query!r}"
            )
        trained_name = self.hparams.get("compressor", "ftheta")
        if str(cfg.compressor.get("name", "ftheta")) != trained_name and ftheta is not None:
            raise InputError(
                f"checkpoint {self.path} holds compressor {trained_name!r}, but compressor.name={cfg.compressor.get('name')!r}"
            )
        config_class = COMPRESSORS.get(trained_name).config_class
        if ftheta is not None and config_class.from_dict(trained) != config_class.from_dict(ftheta):
            differ = sorted(k for k in {*trained, *ftheta} if trained.get(k) != ftheta.get(k))
            raise InputError(
                f"checkpoint {self.path} holds an f_θ with other compressor.net settings ({', '.join(differ)}): "
                "resume with the settings it was trained with"
            )


def read_checkpoint(path: Any) -> Checkpoint | None:
    """`ckpt_path`, read with weights_only=True (no pickled objects) and checked to be a checkpoint
    of this stage, before any cache is built or read; None when no path is set."""
    if path in (None, ""):
        return None
    path = Path(str(path))
    if not path.is_file():
        raise InputError(f"ckpt_path: checkpoint not found: {path}")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises OSError, KeyError, UnpicklingError ... on a non-checkpoint
        raise InputError(
            f"ckpt_path {path}: not a Lightning checkpoint readable with weights_only=True ({_load_failure(err)})"
        ) from None
    if not isinstance(ckpt, dict) or not {"state_dict", "epoch", "hyper_parameters"} <= set(ckpt):
        raise InputError(f"ckpt_path {path}: not a checkpoint written by explain_prune.train (no state_dict / epoch / hyper_parameters)")
    hparams = ckpt["hyper_parameters"]
    if not isinstance(hparams, dict) or not isinstance(hparams.get("ftheta"), dict):
        raise InputError(f"ckpt_path {path}: not an f_θ checkpoint (its hyper_parameters hold no ftheta settings)")
    return Checkpoint(str(path), int(ckpt["epoch"]), dict(hparams))


def _load_failure(err: BaseException) -> str:
    """The reason in torch.load's message (its weights-only refusal opens with a generic paragraph)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            reason = line.split(marker, 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return reason.split(" Please use", 1)[0] or "refused"
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_resume_epochs(checkpoint: Checkpoint | None, cfg: DictConfig) -> None:
    """Lightning refuses a resume whose max_epochs the checkpoint has already passed, but only once
    training starts (and a cache may have been built first)."""
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if checkpoint is not None and max_epochs is not None and int(max_epochs) <= checkpoint.epoch:
        raise InputError(
            f"trainer.max_epochs={max_epochs} but ckpt_path {checkpoint.path} was saved in epoch {checkpoint.epoch}: "
            f"set trainer.max_epochs above {checkpoint.epoch} to train further"
        )


def fit(
    cfg: DictConfig, cache_dirs: Sequence[Any], output_dir: str | Path, checkpoint: Checkpoint | None = None
) -> dict[str, Any]:
    """Train f_θ, resuming from `checkpoint` (read and epoch-checked by `run`, before the cache)."""
    output_dir = Path(output_dir)
    ckpt_path = None if checkpoint is None else checkpoint.path
    lr = _number(cfg, "compressor.lr")
    # the primary cache must be the selected (model, data, modality); extra caches model + modality
    inputs = compressor_inputs(_plain(cfg.compressor.net))
    caches = open_caches(cache_dirs, expect_meta(cfg, with_data=False), first_expect=expect_meta(cfg), inputs=inputs)
    ftheta = _ftheta_config(cfg, caches)
    if checkpoint is not None:
        checkpoint.check_against(cfg, caches, ftheta)

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from explain_prune.compress.module import CompressorModule, ExportCompressor

    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg, caches, inputs=inputs)
    datamodule.setup("fit")  # split / filter problems fail here, before the trainer starts
    module = CompressorModule(
        ftheta=ftheta,
        lr=lr,
        overlap_ratios=list(cfg.compressor.overlap_ratios),
        cache_meta=datamodule.cache_meta,
        compressor=str(cfg.compressor.get("name", "ftheta")),
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
    trainer = build_trainer(cfg, [checkpoint, export])
    for lg in trainer.loggers:
        lg.log_hyperparams(
            {
                "run": {"model": cfg.model.name, "data": cfg.data.name, "modality": cfg.modality.name,
                        "cache_dirs": [str(d) for d in cache_dirs], "seed": int(cfg.seed)},
                "datamodule": _plain(cfg.datamodule),
                "compressor": _plain(cfg.compressor),
            }
        )
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics_csv = _metrics_file(trainer)
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
        "metrics_csv": metrics_csv,
        "metrics_csv_history": _metrics_history(metrics_csv),
        "resumed_from": ckpt_path,
        "config": _plain(cfg.compressor),
        "global_rank": int(trainer.global_rank),
    }
    if trainer.is_global_zero:
        results["results_json"] = str(_write_results(output_dir, results))
    return results


def validate(
    cfg: DictConfig,
    cache_dirs: Sequence[Any],
    output_dir: str | Path,
    checkpoint: Checkpoint | None,
    eval_dirs: Sequence[Any] | None = None,
) -> dict[str, Any]:
    output_dir = Path(output_dir)
    if checkpoint is None:
        raise InputError("validate_only=true needs ckpt_path=<a .ckpt written by explain_prune.train>")
    ckpt_path = checkpoint.path
    inputs = compressor_inputs(checkpoint.hparams["ftheta"])
    if eval_dirs is not None:
        caches: list[Any] = []
        eval_caches: list[Any] | None = open_caches(eval_dirs, {"model": cfg.model.name}, inputs=inputs)
    else:
        caches = open_caches(cache_dirs, expect_meta(cfg, with_data=False), first_expect=expect_meta(cfg), inputs=inputs)
        eval_caches = None

    from explain_prune.compress.module import CompressorModule

    checkpoint.check_against(cfg, eval_caches or caches)
    try:
        module = CompressorModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"not a compressor checkpoint: {ckpt_path} ({str(err).splitlines()[0]})") from None
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = build_datamodule(cfg, caches, eval_caches=eval_caches, inputs=inputs)
    datamodule.setup("validate")
    trainer = build_trainer(cfg, [])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    lengths = datamodule.val_set.lengths if datamodule.val_set else []
    results = {
        "task": "validate",
        "model": cfg.model.name,
        "checkpoint": ckpt_path,
        "eval_dirs": None if eval_dirs is None else [str(d) for d in eval_dirs],
        "cache_dirs": None if eval_dirs is not None else [str(d) for d in cache_dirs],
        "val_samples": len(lengths),
        "val_lengths": [min(lengths), max(lengths)] if lengths else None,
        "metrics": dict(module.last_val),
        "baselines": dict(module.baselines),
        "metrics_csv": _metrics_file(trainer),
        "global_rank": int(trainer.global_rank),
    }
    if trainer.is_global_zero:
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


__all__ = ["fit", "validate", "open_caches", "build_datamodule", "build_trainer", "expect_meta", "summary_lines"]


PATH_KEYS = ("paths.root_dir", "paths.log_dir", "paths.cache_root")


def _path_overrides() -> list[str]:
    """The user's `paths.*` overrides, so the suggested generate command writes where we read."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (compose API)
        return []
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in PATH_KEYS]


def _is_cache(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def ensure_cache(cfg: DictConfig) -> list[Any]:
    """The cache directories this run reads.  When the data config allows it (`auto_generate:
    true`, the small synthetic default) the cache is built on the spot — or completed, if an
    interrupted run or a smaller `data.limit` left it short: generation resumes and skips the ids
    already cached.  Otherwise a missing cache is a one-line InputError naming the generate command."""
    primary = Path(str(cfg.cache_dir))
    if cfg.data.get("auto_generate", False):
        from explain_prune.stages.generate import build_cache

        state = "completing" if _is_cache(primary) else "no relevance cache yet: building"
        print(f"{state} {primary} from data={cfg.data.name} (data.auto_generate=true)")
        print(build_cache(cfg).line())
    if not _is_cache(primary):
        command = [
            "python",
            "-m",
            "explain_prune.generate",
            f"model={cfg.model.name}",
            f"data={cfg.data.name}",
            f"modality={cfg.modality.name}",
            *_path_overrides(),
        ]
        raise InputError(
            f"no relevance cache at {primary}; build it with: {' '.join(shlex.quote(c) for c in command)}"
        )
    dirs: list[Any] = [str(primary)]
    for extra in cfg.get("extra_cache_dirs") or []:
        dirs.append([str(p) for p in extra] if isinstance(extra, (list, ListConfig)) else str(extra))
    return dirs


def _eval_dirs(cfg: DictConfig) -> list[Any] | None:
    value = cfg.get("eval_cache")
    if value in (None, ""):
        return None
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    for item in items:
        if not Path(str(item)).is_dir():
            raise InputError(f"eval_cache directory not found: {item}")
    return [str(i) for i in items]


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train (or validate) and print where the results are; returns the results dict."""
    set_torch_threads(cfg)  # before the cache is built, which can be most of the work
    eval_dirs = _eval_dirs(cfg)
    checkpoint = read_checkpoint(cfg.get("ckpt_path"))  # a bad checkpoint fails before any cache is built
    if cfg.get("validate_only"):
        cache_dirs = ensure_cache(cfg) if eval_dirs is None else []
        results = validate(cfg, cache_dirs, output_dir, checkpoint, eval_dirs=eval_dirs)
    else:
        if eval_dirs is not None:
            raise InputError("eval_cache is only used with validate_only=true")
        check_resume_epochs(checkpoint, cfg)
        results = fit(cfg, ensure_cache(cfg), output_dir, checkpoint)
    if results.get("global_rank", 0) == 0:
        for line in summary_lines(results):
            print(line, flush=True)
    return results
