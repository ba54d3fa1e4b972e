"""Checking a config node against declared fields: unknown keys, wrong types, values out of range.

Every group of the Hydra config (model, method options, relevance, benchmark, compressor, judge, data)
is checked with these few functions when the config is read, before any weights load, so a typo is one
line naming the key and what it accepts (docs/design.md §Configuration).  A field is declared either
by a dataclass (`check_dataclass`) or by a class's `__init__` signature / `defaults` mapping
(`params_from_signature`, `params_from_defaults`, used by `core.registry`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from explain_prune.core.errors import InputError

ANY = object()  # "no type declared": any value passes


@dataclass(frozen=True)
class Param:
    """One declared setting: its type (a typing annotation or ANY), default, and optional constraints."""

    name: str
    annotation: Any = ANY
    default: Any = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None  # inclusive lower bound for numbers
    maximum: float | None = None  # inclusive upper bound for numbers


def _type_name(annotation: Any) -> str:
    if annotation is ANY:
        return "any value"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a plain (OmegaConf-resolved) value fits a typing annotation; unknown forms pass."""
    if annotation is ANY or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is Path:
        return isinstance(value, (str, Path))
    if origin in (list, tuple, Sequence, typing.Sequence) or annotation in (list, tuple, Sequence):
        return isinstance(value, Sequence) and not isinstance(value, (str, bytes))  # lists, tuples, ListConfig
    if origin in (dict, Mapping, typing.Mapping) or annotation in (dict, Mapping):
        return isinstance(value, Mapping)
    return True  # a type this checker does not model (a class, a callable ...): the constructor decides


def check_value(where: str, param: Param, value: Any) -> None:
    """One InputError line if `value` does not fit `param`."""
    key = f"{where}.{param.name}" if where else param.name
    if not _matches(value, param.annotation):
        raise InputError(f"{key}: expected {_type_name(param.annotation)}, got {value!r}")
    if param.choices is not None and value not in param.choices:
        allowed = ", ".join(str(c) for c in param.choices)
        raise InputError(f"{key}: {value!r} is not allowed (allowed: {allowed})")
    if param.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value) or value < param.minimum:
            raise InputError(f"{key}: must be >= {param.minimum:g}, got {value!r}")
    if param.maximum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value) or value > param.maximum:
            raise InputError(f"{key}: must be <= {param.maximum:g}, got {value!r}")


def check_mapping(where: str, given: Mapping[str, Any], params: Mapping[str, Param], extra: Sequence[str] = ()) -> None:
    """Every key of `given` is declared (or in `extra`, keys another layer reads) and fits its Param."""
    unknown = sorted(set(given) - set(params) - set(extra))
    if unknown:
        known = ", ".join(sorted({*params, *extra})) or "none"
        raise InputError(f"{where}.{unknown[0]}: unknown key (allowed: {known})")
    for name, value in given.items():
        if name in params:
            check_value(where, params[name], value)


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that cannot be resolved here: treat as undeclared
        return {}


def params_from_signature(cls: type, skip: Sequence[str] = ()) -> dict[str, Param]:
    """The keyword settings of `cls.__init__`, typed by its annotations; an `__init__` that forwards
    `**kwargs` to its base class also accepts the base's settings (walked up the MRO)."""
    out: dict[str, Param] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        hints = _hints(klass.__init__)
        forwards = False
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            if name == "self" or name in skip or name in out or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            default = None if p.default is p.empty else p.default
            out[name] = Param(name, hints.get(name, ANY), default)
        if not forwards:
            break
    return out


def params_from_defaults(defaults: Mapping[str, Any], choices: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Param]:
    """Settings declared as a {name: default} mapping: the type is the default's (None: any value)."""
    choices = choices or {}
    out = {}
    for name, default in defaults.items():
        if default is None:
            annotation: Any = ANY
        elif isinstance(default, bool):
            annotation = bool
        elif isinstance(default, int):
            annotation = int
        elif isinstance(default, float):
            annotation = float
        elif isinstance(default, (list, tuple)):
            annotation = list
        elif isinstance(default, Mapping):
            annotation = dict
        else:
            annotation = type(default)
        if default is not None and name in choices:
            annotation = ANY  # the choices are the contract
        allowed = tuple(choices[name]) if name in choices else None
        out[name] = Param(name, annotation, default, allowed)
    return out


def params_from_dataclass(cls: type) -> dict[str, Param]:
    """A dataclass's settable (`init`) fields; `field(metadata={"choices": ..., "minimum": ..., "maximum": ...})`
    adds constraints."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:  # state the object sets itself
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = f.metadata.get("choices")
        out[f.name] = Param(
            f.name, hints.get(f.name, ANY), default, tuple(choices) if choices else None,
            f.metadata.get("minimum"), f.metadata.get("maximum"),
        )
    return out


def check_dataclass(cls: type, where: str, given: Mapping[str, Any], extra: Sequence[str] = ()) -> Any:
    """`cls(**given)` after checking every key and value of `given` against the dataclass's fields."""
    params = params_from_dataclass(cls)
    check_mapping(where, given, params, extra)
    return cls(**{k: v for k, v in given.items() if k in params})
