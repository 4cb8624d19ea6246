from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...core.config import Config
from ..heads import default_l2_grid

KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    # Sentence encoders were pre-trained contrastively: a SetFit-sized rate (2e-5) only nudges them;
    # all in-batch pairs give each step many more comparisons than SetFit's pair batches, so a
    # larger rate converges in the few steps used here (20 epochs at 8e-5 matched 30 at 5e-5 on
    # SST-5 / Emotion 8-shot runs, in two thirds of the time).
    "text": {"lr": 8e-5},
    "causal_lm": {"lr": 3e-5},
    "image": {"lr": 1e-4},
}


@dataclass
class SetFitConfig(Config):
    """SetFit (Tunstall et al. 2022): body phase (contrastive pairs), then head phase (logistic regression)."""

    epochs: int = 20
    """Body phase: passes over the training examples. Each batch compares all of its pairs, so one pass
    covers ~batch_size/2 pairs per example (SetFit's own loop: one pair per two encodings)."""
    max_steps: int = 200
    """Body phase: at most this many steps whatever the data size."""
    batch_size: int = 32
    """Examples per contrastive step (drawn class-balanced)."""
    lr: float | None = None
    """Body learning rate (default by base kind: 8e-5 text, 1e-4 image)."""
    weight_decay: float = 0.01
    """AdamW weight decay on the body (not on biases and norms)."""
    warmup_ratio: float = 0.1
    """Share of body steps spent warming the learning rate up linearly."""
    lora: bool = False
    """Train LoRA adapters on the body instead of all its weights (bundle: adapter + head, not the body)."""
    r: int = 8
    """LoRA rank (with `lora`)."""
    l2_grid: list[float] = field(default_factory=default_l2_grid)
    """Head phase: L2 strengths tried on a 10% holdout (when every class has >= 5 examples)."""

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.max_steps < 0 or self.batch_size < 2:
            raise ValueError("need epochs >= 0, max_steps >= 0 and batch_size >= 2")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")

    @classmethod
    def kind_defaults(cls) -> dict[str, dict[str, Any]]:
        return KIND_DEFAULTS
