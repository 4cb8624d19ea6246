from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import Config
from ..labels import normalize_label_text

SCORINGS = ("auto", "similarity", "likelihood")


@dataclass
class ZeroShotConfig(Config):
    """Zero-shot classification from the label set alone."""

    label_text: list[str] = field(default_factory=list)
    """Label descriptions: `NAME=text` entries (repeat the flag) or a JSON/YAML file of name -> text.
    Labels without one use their name."""
    answer_word: list[str] = field(default_factory=list)
    """The word that stands for a label instead of its name: `NAME=word` entries (repeat the flag) or a JSON/YAML
    file. Likelihood scoring: the answer the LM is scored on (`ham=normal`: a small LM reads `ham` as food).
    Similarity scoring: the text matched when the label has no description."""
    templates: list[str] = field(default_factory=list)
    """Similarity scoring: sentences with `{}` for the label text, embedded and averaged per label
    (default: `{}` for text bases, `a photo of a {}.` for image-text bases)."""
    scoring: str = "auto"
    """`similarity` (cosine between input and label embeddings), `likelihood` (a causal LM scores each
    label's answer under the chat template), `auto` (likelihood for causal LMs, else similarity)."""
    instruction: str | None = None
    """Likelihood scoring: the task as told to the LM (default: built from the label set)."""
    calibrate: bool = True
    """Likelihood scoring: contextual calibration -- subtract each label's score on content-free inputs."""
    length_norm: bool = False
    """Likelihood scoring: average instead of sum the answer tokens' log-probabilities."""
    scale: float | None = None
    """Similarity scoring: logits = scale * cosine (default: the base's own logit scale, else 20)."""
    batch_size: int = 64
    """Inputs per forward pass."""

    def __post_init__(self) -> None:
        self.label_text = normalize_label_text(self.label_text)
        self.answer_word = normalize_label_text(self.answer_word)
        self.templates = [str(t) for t in ([self.templates] if isinstance(self.templates, str) else self.templates)]
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
