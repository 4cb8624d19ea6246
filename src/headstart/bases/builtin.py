"""Imports every module that registers bases; `registry._ensure_builtins` imports this lazily."""
from . import efficientnet_lite, smollm2, text, tiny  # noqa: F401  (imported for @register_base)
