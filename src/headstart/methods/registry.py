"""The registry of methods: (task, name) -> config dataclass + implementation class.

    register_method("probe", config_cls=ProbeConfig, method_cls=Probe)                  # a classify method
    register_method("qlora", task="sft", config_cls=SFTConfig, method_cls=QloraSFT)      # an sft method

Adding a method = one package under `methods/`, one `register_method` call, one row in the
test matrix (tests fail if a registered classify method has no row). A name may mean different
methods in different tasks (`lora` adapts a classifier's encoder in `classify`, a causal LM in `sft`).
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
    task: str = "classify"


_METHODS: dict[tuple[str, str], MethodSpec] = {}
"""(task, method name) -> its spec."""


def register_method(name: str, *, config_cls: type, method_cls: type, task: str = "classify") -> None:
    if (task, name) in _METHODS:
        raise ValueError(f"method {name!r} is already registered for task {task!r}")
    summary = (method_cls.__doc__ or "").strip().split("\n")[0]
    _METHODS[(task, name)] = MethodSpec(name, config_cls, method_cls, summary, task)
    method_cls.name = name


def list_methods(task: str = "classify") -> list[MethodSpec]:
    """The methods of one task, in registration order."""
    _ensure_builtins()
    return [spec for (t, _), spec in _METHODS.items() if t == task]


def get_method_spec(name: str, task: str = "classify") -> MethodSpec:
    """The spec of method `name` in `task`. A method of another task is a ConfigError naming this
    task's methods; a name no task knows is an UnknownMethodError."""
    _ensure_builtins()
    if (task, name) in _METHODS:
        return _METHODS[(task, name)]
    known = ", ".join(spec.name for spec in list_methods(task))
    elsewhere = sorted(t for t, n in _METHODS if n == name)
    if elsewhere:
        raise ConfigError(f"task {task!r} has methods {known}, not {name!r} (a {'/'.join(elsewhere)} method)")
    raise UnknownMethodError(f"unknown method {name!r}; {task} methods: {known}")


def make_method(name: str, task: str = "classify", **options: Any):
    """Build a method from its name and config options: the one place options are validated
    (unknown options and invalid values are one-line ConfigErrors)."""
    spec = get_method_spec(name, task)
    known = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no option(s) {', '.join(unknown)}; "
                          f"its options: {', '.join(sorted(known))}")
    try:
        config = spec.config_cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {name!r}: {e}") from None
    return spec.method_cls(config)


def _ensure_builtins() -> None:
    from . import builtin  # noqa: F401  (runs the register_method calls)
