"""Importing this module registers the built-in methods."""
from . import finetune, lora, probe, scratch  # noqa: F401
