from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import TrainConfig


@dataclass
class ScratchConfig(TrainConfig):
    """Train every weight from random initialisation, with the same budget as fine-tuning."""

    head_init: str = "random"
    """A probe on random features means nothing: the head starts random too."""

    @classmethod
    def kind_defaults(cls) -> dict[str, dict[str, Any]]:
        # Same epochs and batch as `finetune` (the comparison is at equal budget); a from-scratch
        # network needs a larger rate than a pretrained one.
        return {
            "image": {"epochs": 6, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-3},
            "text": {"epochs": 4, "batch_size": 32, "lr": 5e-4, "head_lr": 5e-4},
            "causal_lm": {"epochs": 3, "batch_size": 16, "lr": 5e-4, "head_lr": 5e-4},
        }
