"""The registry of methods: name -> config dataclass + implementation class.

    register_method("probe", config_cls=ProbeConfig, method_cls=Probe)

Adding a method = one package under `methods/`, one `register_method` call, one row in the
test matrix (tests fail if a registered method has no row).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..core.errors import ConfigError, UnknownMethodError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    method_cls: type
    summary: str


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, config_cls: type, method_cls: type) -> None:
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    summary = (method_cls.__doc__ or "").strip().split("\n")[0]
    _METHODS[name] = MethodSpec(name, config_cls, method_cls, summary)
    method_cls.name = name


def list_methods() -> list[MethodSpec]:
    _ensure_builtins()
    return list(_METHODS.values())


def get_method_spec(name: str) -> MethodSpec:
    _ensure_builtins()
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def make_method(name: str, **options: Any):
    """Build a method from its name and config options (unknown options are a clear error)."""
    spec = get_method_spec(name)
    known = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UnknownMethodError(f"method {name!r} has no option(s) {', '.join(unknown)}; "
                                 f"its options: {', '.join(sorted(known))}")
    try:
        config = spec.config_cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {name!r}: {e}") from None
    return spec.method_cls(config)


def _ensure_builtins() -> None:
    from . import builtin  # noqa: F401  (runs the register_method calls)
