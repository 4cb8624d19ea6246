from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import TrainConfig


@dataclass
class FinetuneConfig(TrainConfig):
    """Partial or full fine-tuning of the base with a new head."""

    unfreeze: str = "all"
    """`all`, or the number of top blocks to train (the rest stay frozen, BN statistics included)."""
    layer_decay: float | None = None
    """Learning rate of block i from the top = lr * layer_decay**i (1.0: one rate for all)."""
    gradual_unfreeze: bool = False
    """ULMFiT: epoch 1 trains the head and top block, each later epoch unfreezes one more block."""
    bn_stats: str = "frozen"
    """`frozen`: BatchNorm layers keep their pretrained running statistics (their scale and shift still
    train) -- small batches from a small dataset only make the statistics noisier; `train`: update them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unfreeze != "all":
            try:
                if int(self.unfreeze) < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"unfreeze must be 'all' or a number of blocks >= 0, got {self.unfreeze!r}") from None
        if self.bn_stats not in ("frozen", "train"):
            raise ValueError(f"bn_stats must be 'frozen' or 'train', got {self.bn_stats!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")

    def blocks_to_train(self, n_blocks: int) -> int:
        return n_blocks if self.unfreeze == "all" else min(n_blocks, int(self.unfreeze))

    @classmethod
    def kind_defaults(cls) -> dict[str, dict[str, Any]]:
        # Fine-tuning rates ~10x below pre-training; the new head learns faster than the body.
        return {
            "image": {"epochs": 6, "batch_size": 16, "lr": 3e-5, "head_lr": 3e-4, "layer_decay": 0.8},
            "text": {"epochs": 4, "batch_size": 32, "lr": 1e-4, "head_lr": 1e-3, "layer_decay": 0.9},
            "causal_lm": {"epochs": 3, "batch_size": 16, "lr": 5e-5, "head_lr": 1e-3, "layer_decay": 0.9},
        }
