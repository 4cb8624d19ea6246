from __future__ import annotations

from dataclasses import dataclass

from ..adaptation import AdaptConfig


@dataclass
class DannConfig(AdaptConfig):
    """DANN: features that a domain discriminator cannot tell apart, learnt through a gradient-reversal layer."""

    bottleneck: int = 256
    """Width of the bottleneck (Linear-BN-ReLU) between the base's features and the classifier; the
    discriminator sees its output (TLlib's setup). 0: none (the discriminator sees the base's features)."""
    hidden: int = 1024
    """Width of the discriminator's two hidden layers."""
    weight: float = 1.0
    """Weight of the domain loss beside the source cross-entropy."""
    gamma: float = 10.0
    """Reversal strength schedule lambda_p = 2 / (1 + exp(-gamma * p)) - 1 over training progress p (Ganin et al.)."""
    lr_schedule: str = "ganin"
    """`ganin`: lr_p = lr / (1 + 10 p)^0.75 (Ganin et al.); `cosine`: warm-up then cosine, as the other methods."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck < 0 or self.hidden < 1 or self.weight < 0 or self.gamma <= 0:
            raise ValueError("need bottleneck >= 0, hidden >= 1, weight >= 0, gamma > 0")
        if self.lr_schedule not in ("ganin", "cosine"):
            raise ValueError(f"lr_schedule must be 'ganin' or 'cosine', got {self.lr_schedule!r}")
