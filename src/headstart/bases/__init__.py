"""Bases: pretrained encoders behind one `Backbone` interface, found by name in a registry.

>>> from headstart.bases import load_base
>>> base = load_base("efficientnet-lite0")
>>> base.info.kind, base.feature_dim
('image', 1280)
"""
from .backbone import Backbone, BaseInfo
from .registry import BaseSpec, get_base_spec, list_bases, load_base, register_base

__all__ = ["Backbone", "BaseInfo", "BaseSpec", "get_base_spec", "list_bases", "load_base", "register_base"]
