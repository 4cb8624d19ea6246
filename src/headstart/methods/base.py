"""What every method shares: the specialist model, the common training config, the method protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Config
from ..engine.memory import Budget
from ..core.storage import ADAPTER_DIR  # noqa: F401  (lora and setfit save their adapter there)
from ..data import Dataset, Split, loader_for  # noqa: F401  (loader_for: methods import it from here)
from ..engine.checkpoint import copy_state_into, trainable_state


class SpecialistModel(nn.Module):
    """A backbone (maybe wrapped by PEFT) and a linear head: logits = head(backbone(**batch)).

    `normalize=True` makes it a cosine classifier: features are centred (`center`, a stored buffer:
    zero unless the method sets it) and L2-normalised before the head, whose rows are then (scaled)
    unit class vectors -- label embeddings (`zeroshot`) or class means (`prototype`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, normalize: bool = False):
        super().__init__()
        self.backbone = backbone
        dim = _raw(backbone).feature_dim
        self.head = nn.Linear(dim, num_classes)
        self.normalize = normalize
        if normalize:
            self.register_buffer("center", torch.zeros(dim))

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:  # [B, num_classes]
        return self.classify(self.backbone(**batch))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from backbone features [B, D] (the path cached features take)."""
        if self.normalize:
            features = F.normalize(features.float() - self.center, dim=-1)
        return self.head(features)

    def collate(self, items, train: bool = False) -> dict[str, torch.Tensor]:
        """Raw examples -> the batch `forward` takes."""
        return self.base.collate(items, train)

    @property
    def base(self):
        """The underlying headstart Backbone (under any PEFT wrapper)."""
        return _raw(self.backbone)


def _raw(backbone: nn.Module):
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


@dataclass
class FitContext:
    """Run-level settings every method receives (not part of a method's config)."""

    seed: int = 0
    checkpoint_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    use_cache: bool = True
    log: Callable[[str], None] = print
    fingerprint: dict = field(default_factory=dict)
    target: "Split | None" = None
    """Unlabelled target-domain examples for the adaptation methods (labels -1; see methods/adaptation.py)."""
    memory_budget: Budget | None = None
    """The run's memory budget (engine/memory.py); None: methods resolve the default when they plan."""
    hooks: tuple = ()
    """Extra engine hooks (engine/trainer.py `Hook`) for the methods that train through `TrainedMethod`
    (finetune, lora, scratch): a learning curve on a test split, a logger. Closed-form methods ignore them."""


@dataclass
class FitResult:
    model: SpecialistModel
    history: list[dict[str, float]] = field(default_factory=list)
    train_s: float = 0.0
    examples_per_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    """Method-specific facts for the manifest (chosen L2, best epoch, features extracted...)."""
    is_main_process: bool = True
    method: "Method | None" = None
    """The method that actually trained the model when it is not the one called (`auto` delegates)."""
    config: Any = None
    """The config the method actually used (kind defaults filled in); the manifest records it. None: the
    method's own config as given."""
    training: dict[str, Any] = field(default_factory=dict)
    """How the engine trained it: processes, device, precision (empty for closed-form methods)."""


@dataclass
class TrainConfig(Config):
    """Options shared by every method that trains through the engine. `None` = a default for the base kind."""

    epochs: int | None = None
    """Passes over the training data (early stopping may end sooner)."""
    batch_size: int | None = None
    """Examples per step."""
    lr: float | None = None
    """Peak learning rate of the top backbone block (lower blocks get less with layer_decay)."""
    head_lr: float | None = None
    """Peak learning rate of the new classification head."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not on biases and norms)."""
    warmup_ratio: float = 0.1
    """Share of all steps spent warming the learning rate up linearly from 0."""
    patience: int = 3
    """Early stopping: epochs without a better validation accuracy before stopping (0: never)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    early_stopping: str = "auto"
    """Validation for early stopping and best-epoch selection: `auto` (the dataset's val split, else a 10%
    holdout of train if that is >= 100 examples, else none: train on all, keep the last epoch), `holdout`, `none`."""
    head_init: str = "probe"
    """`probe`: start the head from a linear probe on the frozen features (LP-FT, Kumar et al. 2022: less
    distortion of pretrained features, better accuracy); `random`: a freshly initialised head."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not float(v) > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if self.early_stopping not in ("auto", "holdout", "none"):
            raise ValueError(f"early_stopping must be 'auto', 'holdout' or 'none', got {self.early_stopping!r}")
        if self.head_init not in ("probe", "random"):
            raise ValueError(f"head_init must be 'probe' or 'random', got {self.head_init!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


class Method:
    """Protocol of a method. `name` is set by `register_method`."""

    name: str = ""
    needs_pretrained: bool = True
    """False for `scratch`: the bundle holds every weight, the base is only the architecture."""
    needs_examples: bool = True
    """False for `zeroshot`: it uses the label names only, so it runs with `shots=0`."""
    frozen_base: bool = False
    """True when the base is never changed (probe, prototype, zeroshot): predictions reuse cached features."""

    def __init__(self, config):
        self.config = config

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        raise NotImplementedError

    def trained_state(self, model: SpecialistModel) -> dict[str, torch.Tensor]:
        """Only what this method trained: what the bundle stores beside the base reference."""
        return {k: v.detach() for k, v in trainable_state(model).items()}

    def save_artifacts(self, model: SpecialistModel, folder: Path, base_name: str) -> None:
        """Extra files in the bundle (PEFT adapters); none by default."""

    def restore(self, backbone, num_classes: int, state: dict[str, torch.Tensor], folder: Path) -> SpecialistModel:
        """Rebuild the trained specialist from the base, the stored state and the bundle folder."""
        model = SpecialistModel(backbone, num_classes)
        copy_state_into(model, state)
        return model

    def config_json(self) -> dict[str, Any]:
        return self.config.to_json()
