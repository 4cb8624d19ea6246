"""Importing this module registers the built-in methods."""
from . import (adabn, auto, baselines, coral, dann, finetune, incontext, lora, probe, prototype,  # noqa: F401
               scratch, selftrain, setfit, zeroshot)
