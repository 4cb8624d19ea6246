from __future__ import annotations

from dataclasses import dataclass

from ...core.config import Config


@dataclass
class AutoConfig(Config):
    """Let headstart choose the method."""

    allow_slow: bool = True
    """Allow methods that train the base (setfit, lora) when they are the more accurate choice; False keeps to
    frozen-base methods (zeroshot, prototype, probe) that fit in seconds."""
