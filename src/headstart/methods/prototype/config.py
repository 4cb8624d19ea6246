from __future__ import annotations

from dataclasses import dataclass

from ...core.config import Config


@dataclass
class PrototypeConfig(Config):
    """Nearest class mean (prototype) on frozen features."""

    center: bool = True
    """Subtract the mean training feature before normalising (SimpleShot's CL2N, Wang et al. 2019): removes
    the direction every embedding shares, which otherwise dominates cosine similarity."""
    scale: float = 20.0
    """Logits = scale * cosine similarity: sets how peaked the probabilities are (not the predicted label)."""
    batch_size: int = 64
    """Examples per batch during feature extraction."""

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
