"""Check a composed stage config before anything heavy runs (docs/design.md §Configuration).

`cli.task` calls `check_config(cfg)` first in every entry point: each group present in the config
(model, modality, method, relevance, benchmark, judge, data, compressor) and the stage's own
top-level settings are checked against their declared fields, so a typo, a wrong type or a value
out of range is one `error: <key>: ...` line and exit 2 before any weights or data are read.
The groups' schemas live with the code that reads them (the registries' classes, RelevanceSettings,
FThetaConfig); the model and modality schemas, which several adapters share, live here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from explain_prune.core import InputError
from explain_prune.core.retention import check_retention
from explain_prune.core.schema import Param, check_dataclass, check_mapping, check_value, params_from_dataclass
from explain_prune.data.video import SAMPLING_RULES
from explain_prune.models import FAMILIES
from explain_prune.models.base import DTYPES, resolve_device

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # flash_attention_2: refused in check_model with the reason


@dataclass
class ModelConfig:
    """conf/model/*.yaml: which checkpoint (or tiny random model), its precision and its input budget."""

    name: str = ""
    family: str = field(default="", metadata={"choices": tuple(FAMILIES)})
    pretrained: str | None = None  # hub id or local folder; null: build `tiny` with random weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N (models.base.resolve_device)
    dtype: str = field(default="auto", metadata={"choices": ("auto", *DTYPES)})  # auto: bfloat16 on cuda, float32 on cpu
    attn_implementation: str = field(default="sdpa", metadata={"choices": ATTN_IMPLEMENTATIONS})
    trust_remote_code: bool = False
    system_prompt: str | None = None
    conversation: str | None = None  # VILA only: the chat template its checkpoint was trained with (models.vila.adapter)
    tiny: dict | None = None  # architecture of the random-weight model (family-specific keys)
    image: dict | None = None
    video: dict | None = None
    llm: dict | None = None  # language-model widths for FLOPs / KV accounting


@dataclass
class ImageBudget:
    min_pixels: int | None = field(default=None, metadata={"minimum": 1})
    max_pixels: int | None = field(default=None, metadata={"minimum": 1})
    aspect_ratio: str | None = None  # VILA: resize | pad
    vision_aspect_ratio: str | None = None  # LLaVA-OV: anyres_max_9 ...


@dataclass
class VideoBudget:
    num_frames: int = field(default=8, metadata={"minimum": 1})
    min_pixels: int | None = field(default=None, metadata={"minimum": 1})  # Qwen2-VL (default 128·28·28, as qwen-vl-utils)
    max_pixels: int | None = field(default=None, metadata={"minimum": 1})
    sampling: str = field(default="linspace", metadata={"choices": SAMPLING_RULES})


@dataclass
class ModalityConfig:
    name: str = field(default="image", metadata={"choices": ("image", "video")})
    num_frames: int | None = field(default=None, metadata={"minimum": 1})
    sampling: str | None = field(default=None, metadata={"choices": (*SAMPLING_RULES, None)})


# Top-level settings of the stages: name -> Param (only those present in a stage's config are checked).
STAGE_SETTINGS = {
    p.name: p
    for p in (
        Param("strict", bool),
        Param("batch_size", int, minimum=1),
        Param("max_new_tokens", int | None, minimum=1),
        Param("torch_threads", int | None, minimum=1),
        Param("num_workers", int | None, minimum=0),
        Param("shard_id", int, minimum=0),
        Param("num_shards", int, minimum=1),
        Param("shard_size", int, minimum=1),
        Param("n_visual", int | None, minimum=1),
        Param("bytes_per_value", int, minimum=1),
        Param("seed", int),  # synthetic_fit's own settings from here on
        Param("steps", int, minimum=1),
        Param("lr", float, minimum=0.0),
        Param("weight_decay", float, minimum=0.0),
        Param("pct_start", float, minimum=0.0, maximum=1.0),
        Param("grad_clip", float, minimum=0.0),
        Param("threads", int, minimum=1),
        Param("eval_every", int, minimum=1),
        Param("target_accuracy", float, minimum=0.0, maximum=1.0),
        Param("out_dir", str),
    )
}


def _plain(node: Any) -> Any:
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _mapping(where: str, node: Any) -> dict[str, Any]:
    value = _plain(node)
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def check_model(node: Any) -> None:
    model = _mapping("model", node)
    if str(model.get("attn_implementation")).startswith("flash_attention"):
        raise InputError(
            f"model.attn_implementation: {model['attn_implementation']} is not supported: the engine passes 4-D "
            "masks for pruned tokens, which flash-attn reads as padding masks; use sdpa (the default)"
        )
    check_dataclass(ModelConfig, "model", model)
    resolve_device(model.get("device", "auto"))
    if model.get("conversation") is not None:
        if model.get("family") != "vila":
            raise InputError(f"model.conversation: only the vila family reads it (this model is {model.get('family')!r})")
        from explain_prune.models.vila.adapter import CONVERSATIONS

        if model["conversation"] not in CONVERSATIONS:
            raise InputError(
                f"model.conversation: {model['conversation']!r} is not allowed (allowed: {', '.join(CONVERSATIONS)})"
            )
    if model.get("pretrained") is None and not model.get("tiny"):
        raise InputError(f"model {model.get('name')!r}: pretrained is null and there is no tiny: architecture to build")
    for key, schema in (("image", ImageBudget), ("video", VideoBudget)):
        if model.get(key) is not None:
            check_dataclass(schema, f"model.{key}", model[key])


def check_method(node: Any) -> None:
    """The method's name, retention and options; building it runs its own range checks (cheap: no model)."""
    from explain_prune.methods import METHODS, build_from_config

    method = _mapping("method", node)
    check_mapping("method", method, {"name": Param("name", str), "retention": Param("retention"), "options": Param("options")})
    METHODS.get(method.get("name"))
    if "retention" in method:
        try:
            check_retention(method["retention"])
        except InputError as err:
            raise InputError(f"method.retention: {str(err).removeprefix('retention ')}") from None
    METHODS.check(method["name"], _mapping("method.options", method.get("options") or {}), "method.options")
    try:
        build_from_config(method)
    except InputError as err:
        raise InputError(f"method ({method['name']}): {err}") from None


def check_benchmark(node: Any) -> None:
    from explain_prune.benchmarks import BENCHMARKS

    bench = _mapping("benchmark", node)
    name = bench.pop("name", None)
    BENCHMARKS.check(BENCHMARKS.get(name).name, bench, "benchmark")


def check_judge(node: Any) -> None:
    from explain_prune.benchmarks.judge import JUDGES

    judge = _mapping("judge", node)
    name = judge.pop("name", "none")
    if name in (None, "none"):
        check_mapping("judge", judge, {})
        return
    JUDGES.check(JUDGES.get(name).name, judge, "judge")


def check_data(node: Any) -> None:
    from explain_prune.data.sources import COMMON_KEYS, SOURCES

    data = _mapping("data", node)
    if data.get("seed") is None:
        data.pop("seed", None)
    SOURCES.check(SOURCES.get(data.get("source")).name, data, "data", extra=COMMON_KEYS)


def check_relevance(node: Any) -> None:
    from explain_prune.explain.relevance import RelevanceSettings

    check_dataclass(RelevanceSettings, "relevance", _mapping("relevance", node))


@dataclass
class CompressorTraining:
    """conf/compressor/*.yaml: f_θ's architecture (`net`, checked by the compressor registry) and objective."""

    name: str = "ftheta"  # the COMPRESSORS class (compress/network.py); net holds its config_class's settings
    net: dict = field(default_factory=dict)
    lr: float = field(default=1e-3, metadata={"minimum": 0.0})
    mask_ratio: float = field(default=0.5, metadata={"minimum": 0.0})
    overlap_ratios: list = field(default_factory=list)


def check_compressor(node: Any) -> None:
    from explain_prune.compress.network import COMPRESSORS

    compressor = _mapping("compressor", node)
    check_dataclass(CompressorTraining, "compressor", compressor)
    name = compressor.get("name", "ftheta")
    COMPRESSORS.get(name)  # an unknown name: one line listing the registered ones
    net = _mapping("compressor.net", compressor.get("net") or {})
    COMPRESSORS.check(name, net, "compressor.net")
    if "in_channels" in net:
        raise InputError("compressor.net.in_channels: set by train from the cache's features, not by the config")
    try:
        COMPRESSORS.get(name).config_class.from_dict(net)
    except InputError as err:
        raise InputError(f"compressor.net: {err}") from None
    if not 0.0 <= float(compressor.get("mask_ratio", 0.5)) < 1.0:
        raise InputError(f"compressor.mask_ratio: must be in [0, 1), got {compressor['mask_ratio']!r}")


TRAINER_MINIMUMS = {"max_epochs": 1, "min_epochs": 0, "log_every_n_steps": 1, "check_val_every_n_epoch": 1,
                    "accumulate_grad_batches": 1, "num_nodes": 1}
TRAINER_OWN = ("callbacks", "logger")  # built by the train stage, not set in conf/trainer


def _resolvable(node: Any) -> Any:
    """`node` without the values that only resolve inside a Hydra run (`${hydra:runtime.output_dir}`
    under the compose API); those are the project's own paths, not user input."""
    if not OmegaConf.is_dict(node):
        return node
    from omegaconf.errors import InterpolationResolutionError

    kept = {}
    for key in node:
        try:
            kept[key] = _plain(node[key])
        except InterpolationResolutionError:
            continue
    return kept


def check_trainer(node: Any) -> None:
    """conf/trainer/*.yaml against `lightning.pytorch.Trainer`'s own signature (its typed keyword
    settings), plus the lower bounds Lightning itself only finds out mid-run."""
    import dataclasses

    from lightning.pytorch import Trainer

    from explain_prune.core.schema import params_from_signature

    trainer = _mapping("trainer", _resolvable(node))
    trainer.pop("_target_", None)
    params = {
        name: dataclasses.replace(param, minimum=TRAINER_MINIMUMS.get(name))
        for name, param in params_from_signature(Trainer, skip=TRAINER_OWN).items()
    }
    check_mapping("trainer", trainer, params)


def _check_generator(where: str, node: Any) -> None:
    from explain_prune.synthetic.generator import synthetic_config

    try:
        synthetic_config(node)
    except InputError as err:
        raise InputError(f"{where}: {str(err).removeprefix('synthetic: ')}") from None


def check_curriculum(node: Any) -> None:
    """synthetic_fit's `curriculum` against `synthetic.fit.Curriculum`."""
    from explain_prune.synthetic.fit import Curriculum

    given = _mapping("curriculum", node)
    check_mapping("curriculum", given, params_from_dataclass(Curriculum))
    if given.get("stop", 1) < given.get("start", 1):
        raise InputError(f"curriculum.stop: must be >= curriculum.start ({given['start']}), got {given['stop']}")


FIT_TRAINING = {p.name: p for p in (Param("streams", dict), Param("cycle", list), Param("val", dict),
                                    Param("val_n", int, minimum=1))}
FIT_HELDOUT_SET = {p.name: p for p in (Param("config", dict), Param("n", int, minimum=1), Param("ablation_n", int, minimum=0))}


def check_training(node: Any) -> None:
    """synthetic_fit's `training`: each stream against `synthetic.fit.Stream` and the generator's options."""
    from explain_prune.synthetic.fit import Stream

    given = _mapping("training", node)
    check_mapping("training", given, FIT_TRAINING)
    streams = given.get("streams") or {}
    if not streams:
        raise InputError("training.streams: name at least one training stream")
    for name, stream in streams.items():
        where = f"training.streams.{name}"
        stream = _mapping(where, stream)
        check_mapping(where, stream, params_from_dataclass(Stream))
        _check_generator(f"{where}.config", stream.get("config"))
    cycle = list(given.get("cycle") or [])
    if not cycle or set(cycle) - set(streams):
        raise InputError(f"training.cycle: must name streams in {sorted(streams)}, got {cycle}")
    _check_generator("training.val", given.get("val"))


def check_heldout(node: Any) -> None:
    """synthetic_fit's `heldout` sets; the first one is the target."""
    sets = _mapping("heldout", node)
    if not sets:
        raise InputError("heldout: name at least one held-out set (the first one is the target)")
    for name, held in sets.items():
        where = f"heldout.{name}"
        held = _mapping(where, held)
        check_mapping(where, held, FIT_HELDOUT_SET)
        _check_generator(f"{where}.config", held.get("config"))
        if held.get("ablation_n", 0) > held.get("n", 0):
            raise InputError(f"{where}.ablation_n: must be <= {where}.n ({held.get('n')}), got {held['ablation_n']}")


GROUP_CHECKS = {
    "model": check_model,
    "modality": lambda node: check_dataclass(ModalityConfig, "modality", _mapping("modality", node)),
    "method": check_method,
    "relevance": check_relevance,
    "benchmark": check_benchmark,
    "judge": check_judge,
    "data": check_data,
    "compressor": check_compressor,
    "trainer": check_trainer,
    "curriculum": check_curriculum,
    "training": check_training,
    "heldout": check_heldout,
}


def check_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Every group and top-level setting of a stage config; the first problem is one InputError line."""
    for key, check in GROUP_CHECKS.items():
        if key in cfg and cfg[key] is not None:
            check(cfg[key])
    method, modality = cfg.get("method"), cfg.get("modality")
    if method is not None and modality is not None and modality.get("name") is not None:
        from explain_prune.methods import METHODS

        supported = METHODS.get(method.get("name")).modalities
        if modality.get("name") not in supported:
            raise InputError(f"method={method.get('name')} defines a rule for {' and '.join(supported)} inputs only, "
                             f"not modality={modality.get('name')}")
    model = _plain(cfg.get("model")) or {}
    layers = (model.get("llm") or {}).get("num_layers")
    if method is not None and isinstance(layers, int) and layers > 0:
        from explain_prune.methods import build_from_config

        try:  # a pruning layer the model lacks, or a schedule its depth cannot reach
            build_from_config(method).visual_tokens_per_layer(100, layers)
        except InputError as err:
            raise InputError(f"method ({method.get('name')}) on model={model.get('name')} ({layers} layers): {err}") from None
    bench, judge = cfg.get("benchmark"), cfg.get("judge")
    if bench is not None and bench.get("llm_matcher") and (judge is None or judge.get("name", "none") in (None, "none")):
        raise InputError("benchmark.llm_matcher=true asks the judge to read the answers: set judge=openai_compatible (or judge=fake)")
    for key, param in STAGE_SETTINGS.items():
        if key in cfg:
            check_value("", param, _plain(cfg[key]))
