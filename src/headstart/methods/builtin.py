"""Importing this module registers the built-in methods of every task (classify, sft, dpo)."""
from . import (adabn, auto, baselines, coral, dann, dpo, finetune, incontext, lora, probe, prototype,  # noqa: F401
               scratch, selftrain, setfit, sft, zeroshot)
