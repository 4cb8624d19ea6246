"""What the unsupervised domain-adaptation methods share: their config, the backbone mode, the bundle.

Every adaptation method receives the labelled source as `data` and the unlabelled target as
`ctx.target` (a `Split` whose labels are all -1: the API strips them, so no method can peek; only
`target-oracle` is handed the real ones). Each runs in one of three backbone modes:

    frozen    cached features of the untouched base; what trains is a head (and, for dann, a bottleneck)
    lora      PEFT LoRA adapters + head, trained through the model
    finetune  the base's top blocks + head

The mode's ordinary method (`probe`, `lora`, `finetune`) is the *trainer*: it prepares the model,
and its bundle rules (what is stored, PEFT adapter folder, restore) are reused, so an adapted
bundle is a normal bundle that `headstart.load` rebuilds without running any adaptation code.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Dataset, Split
from ..engine.checkpoint import copy_state_into
from ..engine.checkpoint import trainable_state
from ..core.errors import ConfigError, DataError
from .base import FitContext, Method, SpecialistModel, TrainConfig

BACKBONE_MODES = ("frozen", "lora", "finetune")


@dataclass
class AdaptConfig(TrainConfig):
    """Shared options of the domain-adaptation methods (the training ones apply to lora/finetune/dann)."""

    backbone: str = "frozen"
    """`frozen` (cached features, seconds), `lora` (PEFT adapters through the base) or `finetune` (the base's
    top blocks): how much of the base adapts."""
    r: int = 8
    """LoRA rank (backbone=lora)."""
    unfreeze: str = "all"
    """Top blocks to train (backbone=finetune): `all` or a number."""
    l2: float | None = None
    """Frozen mode: L2 strength of the head (None: searched on a 10% holdout of the source)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone not in BACKBONE_MODES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONE_MODES)}, got {self.backbone!r}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.l2 is not None and self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")

    def resolved(self, kind: str) -> "AdaptConfig":
        """`None` options take the trainer's defaults for the base kind (frozen mode: the head's own)."""
        from .finetune.config import FinetuneConfig
        from .lora.config import LoraMethodConfig

        table = {"lora": LoraMethodConfig, "finetune": FinetuneConfig}.get(self.backbone)
        defaults = table.kind_defaults().get(kind, table.kind_defaults()["text"]) if table else self.frozen_defaults()
        values = {k: v for k, v in self.to_json().items()}
        for k, v in defaults.items():
            if k in values and values[k] is None:
                values[k] = v
        return type(self)(**values)

    def frozen_defaults(self) -> dict[str, Any]:
        """Training on cached features (dann's bottleneck): many cheap steps."""
        return {"epochs": 30, "batch_size": 64, "lr": 1e-3, "head_lr": 1e-3}


class AdaptationMethod(Method):
    """A method that also uses unlabelled target data (`ctx.target`)."""

    config: AdaptConfig
    needs_target = True
    accepts_target = True
    uses_target_labels = False
    """Only `target-oracle` may train on target labels; the API strips them for every other method."""

    @property
    def frozen_base(self) -> bool:  # type: ignore[override]
        return self.config.backbone == "frozen"

    def resolved(self, kind: str, **changes: Any) -> "AdaptationMethod":
        """A copy of this method with its config's defaults for the base kind filled in (and `changes`
        applied): a fit works on the copy, so the method object it was called on never changes."""
        other = copy.copy(self)
        other.config, other._trainer = replace(self.config.resolved(kind), **changes), None
        return other

    # ---- the trainer of the backbone mode -------------------------------------------------------
    def trainer(self) -> Method:
        """The ordinary method that trains (or leaves frozen) the base in this mode; built once."""
        if getattr(self, "_trainer", None) is None:
            from .registry import make_method

            cfg = self.config
            if cfg.backbone == "frozen":
                self._trainer = make_method("probe", **({"l2": cfg.l2} if cfg.l2 is not None else {}))
            else:
                shared = {k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__}
                extra = {"r": cfg.r} if cfg.backbone == "lora" else {"unfreeze": cfg.unfreeze}
                self._trainer = make_method(cfg.backbone, **shared, **extra)
        return self._trainer

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        """The head the bundle holds (dann: bottleneck + classifier); a linear layer by default."""
        return nn.Linear(feature_dim, num_classes)

    def prepare(self, backbone, num_classes: int) -> SpecialistModel:
        """A fresh model in this mode (PEFT-wrapped for lora) with this method's head."""
        trainer = self.trainer()
        if self.config.backbone == "frozen":
            model = SpecialistModel(backbone, num_classes)
            for p in backbone.parameters():
                p.requires_grad_(False)
        else:
            model = trainer.prepare(backbone, num_classes, trainer.config.resolved(backbone.kind))
        model.head = self.make_head(model.base.feature_dim, num_classes)
        return model

    # ---- bundle: the trainer's rules, with this method's head ---------------------------------
    def trained_state(self, model: SpecialistModel) -> dict[str, torch.Tensor]:
        if self.config.backbone == "finetune":
            state = trainable_state(model)
        else:  # frozen / lora: the base (and the PEFT adapter, saved by save_artifacts) is not in here
            state = {}
        state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
        return {k: v.detach() for k, v in state.items()}

    def save_artifacts(self, model: SpecialistModel, folder: Path, base_name: str) -> None:
        self.trainer().save_artifacts(model, folder, base_name)

    def restore(self, backbone, num_classes: int, state: dict[str, torch.Tensor], folder: Path) -> SpecialistModel:
        model = self.trainer().restore(backbone, num_classes, {}, folder)  # base / PEFT adapter, no head yet
        model.head = self.make_head(model.base.feature_dim, num_classes)
        copy_state_into(model, state)
        return model.eval()

    # ---- data ---------------------------------------------------------------------------------
    def target_items(self, ctx: FitContext) -> list[Any]:
        target = getattr(ctx, "target", None)
        if target is None or not len(target):
            raise ConfigError(f"method {self.name!r} adapts to a target domain: pass target data "
                              "(`headstart adapt --target ...`, or fit(..., target=...))")
        return list(target.items)


def labelled_target(data: Dataset, target: Split | None) -> Dataset:
    """The target as a training dataset (for `target-oracle`): every example must carry a label."""
    if target is None or not len(target):
        raise ConfigError("target-oracle trains on the labelled target: pass target data with labels")
    if any(y < 0 for y in target.labels):
        raise DataError("target-oracle needs the target's labels, and this target has none "
                        "(unlabelled target data gives no oracle)")
    return replace(data, splits={"train": target}, source="the labelled target",
                   sampling={**data.sampling, "trained_on": "target"})


def fresh_copy(backbone):
    """An independent copy of a loaded base, so one run's training never leaks into another's."""
    return copy.deepcopy(backbone)
