from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...data import Dataset
from ...engine.features import cached_features
from ...engine.schedule import warmup_cosine_schedule
from ..adaptation import AdaptationMethod
from ..adaptation_fit import fit_with_alignment
from ..base import FitContext, FitResult, SpecialistModel, loader_for
from ..heads import L2_GRID, set_linear
from ..probe.method import fit_head_with_l2_search, fit_linear_head
from .config import CoralConfig
from .maths import coral_loss, coral_transform


class Coral(AdaptationMethod):
    """Align second-order feature statistics: closed-form on frozen features, Deep CORAL loss when training."""

    config: CoralConfig

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        if self.config.backbone != "frozen":
            return fit_with_alignment(self, backbone, data, ctx, make_loss=_deep_coral_loss, aux=None,
                                      lr_schedule=warmup_cosine_schedule(self.config.warmup_ratio),
                                      init_head=_probe_head)
        t0 = time.perf_counter()
        source, target_items = data.split("train"), self.target_items(ctx)
        load = loader_for(backbone.kind)
        xs, _ = cached_features(backbone, source.items, load, 64, ctx.progress, ctx.use_cache)
        xt, _ = cached_features(backbone, target_items, load, 64, ctx.progress, ctx.use_cache)
        # Train on source features that look like the target's; predict on raw target features.
        aligned = coral_transform(xs, xt, self.config.eps)
        w, b, l2, scores = fit_head_with_l2_search(aligned, source.labels, len(data.classes), L2_GRID,
                                                   self.config.l2, 200, ctx.seed)
        model = self.prepare(backbone, len(data.classes))
        set_linear(model.head, w, b)
        train_s = time.perf_counter() - t0
        return FitResult(model=model.eval(), train_s=train_s, examples_per_s=len(source) / max(train_s, 1e-9),
                         details={"l2": l2, "l2_grid_holdout_accuracy": scores, "target_examples": len(target_items),
                                  "backbone": "frozen"})


def _deep_coral_loss(method: Coral, model: SpecialistModel):
    weight, smoothing = method.config.weight, method.config.label_smoothing

    def step_loss(fs, ys, ft, p):
        ce = F.cross_entropy(model.classify(fs).float(), ys, label_smoothing=smoothing)
        align = coral_loss(fs, ft)
        return ce + weight * align, {"ce": ce.item(), "coral": align.item()}

    return step_loss


def _probe_head(model: SpecialistModel, xs: torch.Tensor, labels: list[int]) -> None:
    # LP-FT: start the head from a probe on frozen source features, as the other trained methods do.
    w, b = fit_linear_head(xs, torch.tensor(labels), model.head.out_features, 1e-2)
    set_linear(model.head, w, b)
