"""The registry of bases: name -> static facts (`PretrainedCfg`) + how to build it.

    @register_base("efficientnet-lite0", cfg=PretrainedCfg(kind="image", params=3371008, ...),
                   locate=lambda: weights_file(0))
    def efficientnet_lite0(pretrained: bool = True) -> Backbone: ...

Listing (`list_bases`, `BaseSpec.to_json`) reads only the static facts: it builds nothing and
imports no torch, so registering modules keep their heavy imports inside the builders.
`load_base(name)` also accepts what is not registered: a local model folder, a timm model
name, or a Hugging Face hub id (see `resolve.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.errors import UnknownBaseError
from .pretrained import BaseInfo, PretrainedCfg

if TYPE_CHECKING:
    from .backbone import Backbone


@dataclass(frozen=True)
class BaseSpec:
    """A registered base: its static facts, its builder, and where its weights must be."""

    name: str
    cfg: PretrainedCfg
    build: Callable[..., "Backbone"]
    """build(pretrained: bool = True) -> Backbone; pretrained=False gives random init (the `scratch` baseline)."""
    locate: Callable[[], Path] | None = None
    """Finds the weights on this machine without loading them; raises UnknownBaseError (with the
    install hint) when they are missing. None: nothing to find (the tiny random bases)."""
    hidden: bool = False
    """Tiny random test bases are registered but not listed by `headstart bases`."""
    downloads_on_first_use: bool = False
    """The builder downloads the weights when they are missing (`locate` never does): defaults that would
    start a large download (a ranking's candidates) leave such a base out until it is here."""

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def source(self) -> str:
        return self.cfg.source

    @property
    def description(self) -> str:
        return self.cfg.description

    @property
    def license(self) -> str:
        return self.cfg.license

    @property
    def hf_hub_id(self) -> str:
        return self.cfg.hf_hub_id

    def info(self) -> BaseInfo:
        """The `BaseInfo` that building this base yields, without building it."""
        return BaseInfo.from_cfg(self.name, self.cfg)

    def missing(self) -> str:
        """Why this base cannot be built here (the one-line install hint); '' when its weights are present."""
        if self.locate is None:
            return ""
        try:
            self.locate()
        except UnknownBaseError as e:
            return str(e)
        return ""

    def to_json(self) -> dict[str, Any]:
        """One display row: name, static facts, and whether the weights are installed (`available`, `why`).

        >>> get_base_spec("efficientnet-lite0").to_json()["params"]
        3371008
        """
        why = self.missing()
        return {"name": self.name, **self.cfg.to_json(), "available": not why, "why": why,
                "downloads_on_first_use": self.downloads_on_first_use}


_BASES: dict[str, BaseSpec] = {}


def register_base(name: str, *, cfg: PretrainedCfg, locate: Callable[[], Path] | None = None, hidden: bool = False,
                  downloads_on_first_use: bool = False):
    """Decorator: register a builder under `name` with its static facts `cfg`.

    The builder must import torch / timm / transformers inside its body: registering modules are
    imported by `list_bases`, which must stay light.
    """

    def wrap(fn: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
        if name in _BASES:
            raise ValueError(f"base {name!r} is already registered")
        described = cfg
        if not cfg.description:  # fall back to the builder's docstring, first line
            described = replace(cfg, description=(fn.__doc__ or "").strip().split("\n")[0])
        _BASES[name] = BaseSpec(name, described, fn, locate, hidden, downloads_on_first_use)
        return fn

    return wrap


def list_bases(include_hidden: bool = False) -> list[BaseSpec]:
    """The registered bases, from their static facts only (builds nothing, imports no torch).

    >>> [s.name for s in list_bases()][:2]
    ['efficientnet-lite0', 'efficientnet-lite1']
    """
    _ensure_builtins()
    return [s for s in _BASES.values() if include_hidden or not s.hidden]


def get_base_spec(name: str) -> BaseSpec | None:
    _ensure_builtins()
    return _BASES.get(name)


def load_base(name_or_path: str, pretrained: bool = True) -> "Backbone":
    """Build a backbone from a registered name, a local folder, a timm name or a hub id.

    >>> base = load_base("minilm-l6")
    >>> base.info.kind, base.feature_dim, base.info.license
    ('text', 384, 'apache-2.0')
    """
    spec = get_base_spec(name_or_path)
    if spec is not None:
        backbone = spec.build(pretrained=pretrained)
        # The licence is a fact about the published base, not something the builder can read off the model.
        backbone.info.license = spec.cfg.license
        return backbone
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
