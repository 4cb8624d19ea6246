from __future__ import annotations

from dataclasses import dataclass

from ..adaptation import AdaptConfig


@dataclass
class AdabnConfig(AdaptConfig):
    """AdaBN: train on the source as the backbone mode does, then swap BatchNorm statistics for the target's."""

    source_statistics: bool = True
    """Frozen mode: re-estimate the statistics on the source before fitting the head, so the head learns
    features normalised per domain, exactly as it will see the target's."""
    batch_size_stats: int = 64
    """Images per forward pass while estimating statistics (the estimate averages over all passes)."""
