from __future__ import annotations

from dataclasses import dataclass

from ..adaptation import AdaptConfig


@dataclass
class SelftrainConfig(AdaptConfig):
    """Self-training: fit on the source, pseudo-label confident target examples, refit on both; repeat."""

    rounds: int | None = None
    """Pseudo-labelling rounds (default: 3 frozen, 1 lora/finetune -- each round there is a training run)."""
    threshold: float = 0.6
    """Keep a target example only when the model's top class probability is at least this."""
    max_share: float = 0.8
    """Class-balance guard: in round r of R, class c takes at most (r / R) * max_share * (its source share) *
    (target size) pseudo-labels, the most confident first -- a model that predicts one class everywhere
    cannot flood the training set with it, and early rounds trust only the surest."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.threshold < 1 or not 0 < self.max_share <= 1:
            raise ValueError("need 0 < threshold < 1 and 0 < max_share <= 1")
