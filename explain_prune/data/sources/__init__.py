"""Training-data readers for the relevance cache (App. B): `build_source(cfg.data)`.

A source is an ordered, sized iterable of `Sample | SampleError` (benchmarks.base.SampleError:
id + reason, for rows that cannot be used) with a stable, unique id per row; iterating it twice
gives the same items.  `conf/data/<name>.yaml` selects one:

    source       infinity_mm | llava_video | synthetic
    root         the downloaded dataset directory (not used by synthetic)
    annotation   annotation file(s) relative to root; null = the source's default layout
    limit        keep the first n rows after selection (synthetic: the number of samples)
    seed         seeds the balanced / budgeted draws (synthetic: the generator stream)
    strict       read by the caller (stages.generate): fail on the first SampleError

and, per source: `subsets`, `balanced_per_part`, `group_totals` (infinity_mm, llava_video),
`tasks` (llava_video), `generator` (synthetic).  `name` names the cache directory.  See
docs/data.md for the formats and how to point the configs at real downloads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from explain_prune.core import InputError, SampleError
from explain_prune.data.sources.common import SOURCES, Source
from explain_prune.data.sources.infinity_mm import InfinityMMSource  # importing a module registers its source
from explain_prune.data.sources.llava_video import LLaVAVideoSource
from explain_prune.data.sources.synthetic import SyntheticSource

COMMON_KEYS = ("name", "source", "strict", "auto_generate")  # read by the caller (stages.generate, stages.train), not the source


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
    if cfg.get("seed") is None:  # null: the source's own default seed
        cfg.pop("seed", None)
    SOURCES.check(name, cfg, "data", extra=COMMON_KEYS)
    kwargs = {k: v for k, v in cfg.items() if k not in COMMON_KEYS}
    source = SOURCES.get(name)(**kwargs)
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
