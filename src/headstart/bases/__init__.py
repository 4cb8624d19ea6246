"""Bases: pretrained encoders behind one `Backbone` interface, found by name in a registry.

>>> from headstart.bases import list_bases, load_base
>>> list_bases()[0].to_json()["params"]   # static facts: builds nothing, imports no torch
3371008
>>> base = load_base("efficientnet-lite0")
>>> base.info.kind, base.feature_dim
('image', 1280)
"""
from __future__ import annotations

from typing import Any

from .pretrained import KINDS, BaseInfo, PretrainedCfg
from .registry import BaseSpec, get_base_spec, list_bases, load_base, register_base

__all__ = ["Backbone", "BaseInfo", "BaseSpec", "KINDS", "PretrainedCfg", "get_base_spec", "list_bases", "load_base",
           "register_base"]


def __getattr__(name: str) -> Any:
    # `Backbone` is an nn.Module: importing it loads torch, which listing bases must not pay for.
    if name == "Backbone":
        from .backbone import Backbone

        return Backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
