"""One registry idiom for methods, benchmarks, data sources, judges and compressors.

A class joins a registry with a decorator on its definition::

    @METHODS.register("fastv")
    class FastV(Method):
        defaults = {"layer": 2, "query": "last"}     # its options and their default values
        choices = {"query": ("last", "mean")}         # optional: enumerated options

Classes that take their settings as keyword arguments (benchmarks, sources, judges) declare them by
their `__init__` signature instead, and classes configured by a dataclass (the compressor) name it as
`config_class`.  The registry checks a config node's keys and types against that
declaration (`check`) when the config is read, and builds the instance (`build`); an unknown name or
key is one InputError line listing what is allowed.  Adding a method is then its module plus its yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from explain_prune.core.errors import InputError
from explain_prune.core.schema import (
    Param,
    check_mapping,
    params_from_dataclass,
    params_from_defaults,
    params_from_signature,
)

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> class for one kind of component (`kind` names it in error messages)."""

    def __init__(self, kind: str, skip_args: Sequence[str] = ()):
        self.kind = kind
        self.skip_args = tuple(skip_args)  # positional arguments the caller passes, not settings
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def get(self, name: Any) -> T:
        if name not in self._classes:
            raise InputError(f"unknown {self.kind} {name!r} (allowed: {', '.join(self.names())})")
        return self._classes[name]

    def params(self, name: str) -> dict[str, Param]:
        """The declared settings of `name`: its `defaults` mapping, else its `__init__` keywords."""
        cls = self.get(name)
        config_class = getattr(cls, "config_class", None)  # settings declared as a dataclass
        if config_class is not None:
            return params_from_dataclass(config_class)
        defaults = getattr(cls, "defaults", None)
        if isinstance(defaults, Mapping):
            return params_from_defaults(defaults, getattr(cls, "choices", None))
        return params_from_signature(cls, skip=self.skip_args)

    def check(self, name: str, options: Mapping[str, Any], where: str, extra: Sequence[str] = ()) -> None:
        """Unknown keys and wrong types of `options` (a plain mapping) -> one InputError line."""
        check_mapping(where, options, self.params(name), extra)

    def build(self, name: str, *args: Any, where: str | None = None, **options: Any) -> Any:
        """`cls(*args, **options)` after `check`; `where` names the config node in errors."""
        self.check(name, options, where or f"{self.kind} {name}")
        return self.get(name)(*args, **options)
