"""Pruning methods and their registry: `build_method(name, retention, **options) -> Method`.

Each method lives in its own module and is imported lazily, so listing or building one method
does not import the others' dependencies.  conf/method/<name>.yaml holds each method's defaults.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import OmegaConf

from explain_prune.core import InputError
from explain_prune.methods.base import Method, check_retention, keep_count

# name -> "module:Class"
METHODS: dict[str, str] = {
    "vanilla": "explain_prune.methods.vanilla:Vanilla",
    "random": "explain_prune.methods.random:RandomKeep",
    "gae": "explain_prune.methods.gae:GAE",
    "ours": "explain_prune.methods.ours:Ours",
    "fastv": "explain_prune.methods.fastv:FastV",
    "pdrop": "explain_prune.methods.pdrop:PDrop",
    "dart": "explain_prune.methods.dart:DART",
    "visionzip": "explain_prune.methods.visionzip:VisionZip",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_method(name: str, retention: float = 1.0, **options: Any) -> Method:
    """The method `name` at `retention` (fraction of visual tokens kept) with its options."""
    return method_class(name)(retention, **options)


def build_from_config(cfg: Any, retention: float | None = None) -> Method:
    """From a conf/method/*.yaml node ({name, retention, options}); `retention` overrides the node's."""
    options = cfg.get("options") or {}
    if OmegaConf.is_config(options):
        options = OmegaConf.to_container(options, resolve=True)
    options = dict(options)
    return build_method(str(cfg["name"]), cfg.get("retention", 1.0) if retention is None else retention, **options)


__all__ = ["METHODS", "Method", "build_method", "build_from_config", "method_class", "check_retention", "keep_count"]
