"""Training-data readers for the relevance cache (App. B): `build_source(cfg.data)`.

A source is an ordered, sized iterable of `Sample | SampleError` (benchmarks.base.SampleError:
id + reason, for rows that cannot be used) with a stable, unique id per row; iterating it twice
gives the same items.  `conf/data/<name>.yaml` selects one:

    source       infinity_mm | llava_video | synthetic
    root         the downloaded dataset directory (not used by synthetic)
    annotation   annotation file(s) relative to root; null = the source's default layout
    limit        keep the first n rows after selection (synthetic: the number of samples)
    seed         seeds the balanced / budgeted draws (synthetic: the generator stream)
    strict       read by the caller (explain.collect): fail on the first SampleError

and, per source: `subsets`, `balanced_per_part`, `group_totals` (infinity_mm, llava_video),
`tasks` (llava_video), `generator` (synthetic).  `name` names the cache directory.  See
docs/data.md for the formats and how to point the configs at real downloads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from explain_prune.core import InputError, SampleError
from explain_prune.data.sources.common import Source
from explain_prune.data.sources.infinity_mm import InfinityMMSource
from explain_prune.data.sources.llava_video import LLaVAVideoSource
from explain_prune.data.sources.synthetic import SyntheticSource

COMMON_KEYS = ("name", "source", "strict", "auto_generate")
SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "infinity_mm": ("root", "annotation", "subsets", "balanced_per_part", "group_totals", "limit", "seed"),
    "llava_video": ("root", "annotation", "subsets", "tasks", "balanced_per_part", "group_totals", "limit", "seed"),
    "synthetic": ("limit", "seed", "generator"),
}
SOURCES: dict[str, Callable[..., Any]] = {
    "infinity_mm": InfinityMMSource,
    "llava_video": LLaVAVideoSource,
    "synthetic": SyntheticSource,
}


def _plain(data_cfg: Any) -> dict[str, Any]:
    if isinstance(data_cfg, Mapping):
        return dict(data_cfg)
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = None  # type: ignore[assignment,misc]
    if DictConfig is not None and isinstance(data_cfg, DictConfig):
        return OmegaConf.to_container(data_cfg, resolve=True)  # type: ignore[return-value]
    raise InputError(f"data config must be a mapping, got {type(data_cfg).__name__}")


def build_source(data_cfg: Any) -> Any:
    """The source `data_cfg.source` names, built from the other keys (an unknown source or key,
    a missing root/annotation, or a selection with no rows is an InputError)."""
    cfg = _plain(data_cfg)
    name = cfg.get("source")
    if name not in SOURCES:
        raise InputError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    allowed = SOURCE_KEYS[name]
    unknown = sorted(set(cfg) - set(allowed) - set(COMMON_KEYS))
    if unknown:
        raise InputError(f"data source {name!r}: unknown key(s) {unknown}; known: {sorted(allowed + COMMON_KEYS)}")
    kwargs = {k: cfg[k] for k in allowed if k in cfg}
    if kwargs.get("seed") is None:
        kwargs.pop("seed", None)
    source = SOURCES[name](**kwargs)
    if len(source) == 0:
        raise InputError(f"data source {name!r} selected no rows ({source.describe()})")
    return source


__all__ = [
    "SOURCES",
    "InfinityMMSource",
    "LLaVAVideoSource",
    "SampleError",
    "Source",
    "SyntheticSource",
    "build_source",
]
