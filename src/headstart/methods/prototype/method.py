from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...data import Dataset
from ...engine.checkpoint import copy_state_into
from ...engine.features import cached_features
from ..base import FitContext, FitResult, Method, SpecialistModel, loader_for
from ..heads import set_linear
from .config import PrototypeConfig


class Prototype(Method):
    """Class means of frozen features, nearest by cosine: instant, no training, works from one example per class."""

    config: PrototypeConfig
    frozen_base = True

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        cfg = self.config
        train = data.split("train")
        t0 = time.perf_counter()
        x, extracted = cached_features(backbone, train.items, loader_for(backbone.kind), cfg.batch_size,
                                       ctx.progress, ctx.use_cache)
        num_classes = len(data.classes)
        model = cosine_model(backbone, num_classes)
        center = x.mean(0) if cfg.center else torch.zeros(x.shape[1])
        protos = class_means(F.normalize(x - center, dim=-1), torch.tensor(train.labels), num_classes)
        set_cosine_head(model, protos, cfg.scale, center)
        train_s = time.perf_counter() - t0
        return FitResult(model=model, train_s=train_s, examples_per_s=len(train) / train_s if train_s else 0.0,
                         details={"features_extracted": extracted, "centered": cfg.center})

    def trained_state(self, model: SpecialistModel) -> dict[str, torch.Tensor]:
        return cosine_state(model)

    def restore(self, backbone, num_classes: int, state: dict[str, torch.Tensor], folder: Path) -> SpecialistModel:
        model = cosine_model(backbone, num_classes)
        copy_state_into(model, state)
        return model


def class_means(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, D] mean of the rows of `z` per class (a class without rows gets zeros)."""
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).unsqueeze(1)
    return sums / counts


def cosine_model(backbone, num_classes: int) -> SpecialistModel:
    """A frozen base + cosine head (no parameter trains: the head is set, not learnt)."""
    model = SpecialistModel(backbone, num_classes, normalize=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def set_cosine_head(model: SpecialistModel, class_vectors: torch.Tensor, scale: float,
                    center: torch.Tensor | None = None) -> None:
    """head(z) = scale * cos(z, class_vectors): unit rows times the scale, no bias."""
    set_linear(model.head, scale * F.normalize(class_vectors.float(), dim=-1), torch.zeros_like(model.head.bias))
    if center is not None:
        model.center.copy_(center)


def cosine_state(model: SpecialistModel) -> dict[str, torch.Tensor]:
    """What a cosine classifier stores: its class vectors and the centre."""
    return {"head.weight": model.head.weight.detach(), "head.bias": model.head.bias.detach(),
            "center": model.center.detach()}
