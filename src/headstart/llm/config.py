"""Deprecated: kept only while cli.py still imports `TASKS`; the configs live in methods/sft and methods/dpo,
the tasks (and which methods each has) in `headstart.tasks` and `methods.registry`. Delete once cli.py is
generated from `api.fit`."""
from __future__ import annotations

from ..methods.dpo.config import DPOConfig
from ..methods.sft.config import SFTConfig

TASKS = {"sft": SFTConfig, "dpo": DPOConfig}
"""generative task -> the config dataclass of its methods (what the current CLI turns into flags)."""

__all__ = ["DPOConfig", "SFTConfig", "TASKS"]
