from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import Config
from ..labels import normalize_label_text


@dataclass
class InContextConfig(Config):
    """In-context learning: demonstrations in a causal LM's prompt, nothing trained."""

    examples_per_class: int = 4
    """Training examples per class put in the prompt, sampled with the run's seed (the rest are unused;
    a class with fewer uses all it has)."""
    label_text: list[str] = field(default_factory=list)
    """Label descriptions listed in the prompt: `NAME=text` entries or a JSON/YAML file (the manifest stores
    the resolved `NAME=text` entries)."""
    answer_word: list[str] = field(default_factory=list)
    """The answer the LM gives (and is scored on) for a label instead of its name: `NAME=word` entries or a
    JSON/YAML file (`ham=normal`: a small LM reads `ham` as food). The demonstrations answer with it too."""
    instruction: str | None = None
    """The task instruction before the label list; unset: "Classify the text into one of these categories.
    Reply with the category name only."."""
    calibrate: bool = True
    """Contextual calibration (Zhao et al. 2021): subtract the scores of content-free inputs ("N/A", "", "[MASK]")."""
    length_norm: bool = False
    """Score an answer by the mean instead of the sum of its tokens' log-probabilities."""
    batch_size: int = 8
    """Inputs per LM forward."""

    def __post_init__(self) -> None:
        if int(self.examples_per_class) < 1:
            raise ValueError(f"examples_per_class must be >= 1, got {self.examples_per_class} "
                             "(zero examples: use the zeroshot method)")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.instruction is not None and not str(self.instruction).strip():
            raise ValueError("instruction must not be empty (leave it unset for the default)")
        self.label_text = normalize_label_text(self.label_text)
        self.answer_word = normalize_label_text(self.answer_word)
