from __future__ import annotations

from dataclasses import dataclass

from ..adaptation import AdaptConfig


@dataclass
class CoralConfig(AdaptConfig):
    """CORAL: frozen features get a closed-form re-colouring; lora/finetune train with the Deep CORAL loss."""

    eps: float = 1.0
    """Frozen mode: ridge added to each covariance, relative to its mean variance (Sun et al. 2016 add the
    identity to the covariance of standardised features: 1.0)."""
    weight: float = 1.0
    """lora/finetune: weight of the Deep CORAL loss beside the source cross-entropy (Sun & Saenko 2016)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps <= 0 or self.weight < 0:
            raise ValueError(f"need eps > 0 and weight >= 0, got eps={self.eps} weight={self.weight}")
