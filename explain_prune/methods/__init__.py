"""Pruning methods: each module registers its class with `@METHODS.register(name)`;
conf/method/<name>.yaml holds its default retention and options.  `build_method(name, retention,
**options) -> Method`, `build_from_config(cfg.method)`."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from explain_prune.core.retention import check_retention, keep_count
from explain_prune.methods import dart, fastv, fastvid, gae, ours, pdrop, prunevid, random, vanilla, visionzip  # noqa: F401 (register)
from explain_prune.methods.base import METHODS, Method

BASELINES = ("dart", "fastv", "fastvid", "pdrop", "prunevid", "random", "visionzip")  # the `baseline=` group: methods the paper compares to


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, retention: float = 1.0, **options: Any) -> Method:
    """The method `name` at `retention` (fraction of visual tokens kept) with its options."""
    return METHODS.get(name)(retention, **options)


def build_from_config(cfg: Any) -> Method:
    """From a conf/method/*.yaml node ({name, retention, options}): the one home of a method's settings."""
    options = cfg.get("options") or {}
    if OmegaConf.is_config(options):
        options = OmegaConf.to_container(options, resolve=True)
    return build_method(str(cfg["name"]), cfg.get("retention", 1.0), **dict(options))


__all__ = ["BASELINES", "METHODS", "Method", "build_method", "build_from_config", "method_class", "check_retention", "keep_count"]
