"""Options of preference tuning (`task dpo`): SFT's options plus DPO's beta, smaller steps and batches."""
from __future__ import annotations

from dataclasses import dataclass

from ..sft.config import SFTConfig


@dataclass
class DPOConfig(SFTConfig):
    """Direct Preference Optimisation (Rafailov et al. 2023) from an SFT bundle: the reference is that frozen SFT model."""

    beta: float = 0.1
    """Strength of the implicit KL penalty towards the reference."""
    lr: float = 5e-5
    """Peak learning rate of the adapter (DPO moves in small steps)."""
    batch_size: int = 4
    """Preference pairs per optimizer step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
