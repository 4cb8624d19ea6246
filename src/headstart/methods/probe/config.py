from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import Config
from ...bases.image import FEATURE_VIEWS
from ..heads import default_l2_grid


@dataclass
class ProbeConfig(Config):
    """Linear probe on frozen features."""

    l2_grid: list[float] = field(default_factory=default_l2_grid)
    """L2 strengths tried on a held-out 10% of train; the best is refitted on all of train."""
    l2: float | None = None
    """Fix the L2 strength instead of searching `l2_grid`."""
    max_iter: int = 200
    """L-BFGS iterations per fit."""
    image_features: str = "pooled"
    """Image bases: what the head sees (`bases/image.py` FEATURE_VIEWS): `pooled` (the base's own output), `flip`
    (averaged with the mirror image) or `stages` (flip, plus the last stage's pooled output: fine-grained
    classes such as flower species). Prediction computes the same view, so `flip` and `stages` cost twice."""
    batch_size: int = 64
    """Examples per batch during feature extraction, at most: image bases take fewer when a fast batch needs
    fewer or the memory budget says so (engine/features.extraction_batch); the features are the same."""

    def __post_init__(self) -> None:
        if self.l2 is not None and self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if not self.l2_grid or any(v < 0 for v in self.l2_grid):
            raise ValueError(f"l2_grid must be non-empty and non-negative, got {self.l2_grid}")
        if self.image_features not in FEATURE_VIEWS:
            raise ValueError(f"image_features must be one of {', '.join(FEATURE_VIEWS)}, got {self.image_features!r}")
        if self.max_iter < 1 or self.batch_size < 1:
            raise ValueError("max_iter and batch_size must be >= 1")
