"""Importing this module registers the built-in methods."""
from . import auto, finetune, incontext, lora, probe, prototype, scratch, setfit, zeroshot  # noqa: F401
