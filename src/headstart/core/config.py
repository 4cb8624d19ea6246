"""The base of every config dataclass: JSON round trip and per-base-kind defaults (PEFT's `PeftConfig` role).

A config is a `@dataclass` subclass of `Config` with a docstring per field, validated in `__post_init__`.
Options whose best value depends on the base kind (image, text, causal_lm) default to `None`;
`resolved(kind)` returns a copy with those filled in from `kind_defaults()`, so a fit never needs to
change the config it was given.

>>> @dataclass
... class MyConfig(Config):
...     lr: float | None = None
...     @classmethod
...     def kind_defaults(cls):
...         return {"image": {"lr": 1e-3}, "text": {"lr": 1e-4}}
>>> MyConfig().resolved("image").lr
0.001
>>> MyConfig.from_json(MyConfig(lr=0.5).to_json())
MyConfig(lr=0.5)
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="Config")


@dataclasses.dataclass
class Config:
    """Base of the config dataclasses: `to_json`, `from_json`, `resolved(kind)`."""

    def to_json(self) -> dict[str, Any]:
        """Every field by name; lists and nested dataclasses copied, so the dict can be changed freely."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[C], values: dict[str, Any]) -> C:
        """The config `to_json` wrote (validated again by `__post_init__`); an unknown key is a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    @classmethod
    def kind_defaults(cls) -> dict[str, dict[str, Any]]:
        """Per base kind, the value a `None` option takes; a kind not listed uses the `text` row."""
        return {}

    def resolved(self: C, kind: str) -> C:
        """A deep copy with every `None` option that has a default for this base kind filled in (validated
        again); `self` is unchanged, and changing the copy's lists cannot change it later."""
        table = self.kind_defaults()
        defaults = table.get(kind, table.get("text", {}))
        changes = {k: v for k, v in defaults.items() if getattr(self, k, v) is None}
        return dataclasses.replace(copy.deepcopy(self), **changes)
