"""Imports every module that registers bases; `registry._ensure_builtins` imports this lazily.

These modules hold only static facts and builders whose heavy imports happen inside them, so
importing this loads no torch (tests/test_bases.py checks it).
"""
from . import efficientnet_lite, minilm, mpnet, smollm2, tiny  # noqa: F401  (imported for @register_base)
