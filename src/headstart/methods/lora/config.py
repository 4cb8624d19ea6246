from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import TrainConfig


@dataclass
class LoraMethodConfig(TrainConfig):
    """Low-rank adapters (PEFT LoRA) on the base's attention/linear (text) or 1x1 conv (image) layers."""

    r: int = 8
    """Rank of each adapter."""
    alpha: int = 16
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str | None = None
    """Comma-separated module names to adapt; default: the base's own choice."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"need r >= 1, alpha > 0, 0 <= dropout < 1; got r={self.r} alpha={self.alpha} dropout={self.dropout}")

    @classmethod
    def kind_defaults(cls) -> dict[str, dict[str, Any]]:
        # Adapters start at zero and are few: they take larger rates than full fine-tuning.
        return {
            "image": {"epochs": 6, "batch_size": 16, "lr": 2e-3, "head_lr": 3e-3},
            "text": {"epochs": 5, "batch_size": 32, "lr": 1e-3, "head_lr": 2e-3},
            "causal_lm": {"epochs": 3, "batch_size": 16, "lr": 5e-4, "head_lr": 1e-3},
        }
