from __future__ import annotations

import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ...data import Dataset
from ...engine.checkpoint import copy_state_into
from ...engine.features import encode
from ...core.errors import ConfigError
from ..adaptation import AdaptationMethod
from ..base import FitContext, FitResult, SpecialistModel, loader_for
from ..heads import L2_GRID, set_linear
from ..probe.method import fit_head_with_l2_search
from .config import AdabnConfig

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn_statistics(backbone, items, load, batch_size: int = 64, progress: bool = True,
                            desc: str = "BN statistics") -> int:
    """Replace every BatchNorm's running mean/var by their average over `items` (eval-mode preprocessing).

    Only BN buffers change: the model runs in eval mode except its BN layers, whose momentum is set
    to None (a cumulative average over batches) for the pass and restored after. Returns the number
    of BN layers updated.
    """
    layers = [m for _, m in bn_layers(backbone)]
    saved = [(m.momentum, m.training) for m in layers]
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for start in tqdm(range(0, len(items), batch_size), disable=not progress, file=sys.stderr, desc=desc,
                          unit="batch", dynamic_ncols=True):
            chunk = [load(x) for x in items[start:start + batch_size]]
            backbone(**backbone.collate(chunk, False))
    finally:
        for m, (momentum, _) in zip(layers, saved):
            m.momentum = momentum
        for m, training in modes:  # every module back in the mode it had (train or eval)
            m.training = training
    return len(layers)


class Adabn(AdaptationMethod):
    """AdaBN: re-estimate BatchNorm statistics on target images (image bases with BN); no target training."""

    config: AdabnConfig

    @property
    def frozen_base(self) -> bool:  # the BN statistics change: cached base features no longer apply
        return False

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        if not bn_layers(backbone):
            raise ConfigError(f"adabn re-estimates BatchNorm statistics and {backbone.info.name!r} has no BatchNorm "
                              "layers (transformers use LayerNorm); use coral, dann or selftrain")
        method = self.resolved(backbone.kind)  # a copy: this method object is never changed by a fit
        result = method._fit_resolved(backbone, data, ctx)
        result.config = method.config  # what the manifest records
        return result

    def _fit_resolved(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        cfg = self.config
        source, target_items = data.split("train"), self.target_items(ctx)
        load = loader_for(backbone.kind)
        t0 = time.perf_counter()
        if cfg.backbone == "frozen":
            if cfg.source_statistics:
                recompute_bn_statistics(backbone, source.items, load, cfg.batch_size_stats, ctx.progress,
                                        "BN statistics (source)")
            # Not the feature cache: these features depend on the statistics just set.
            xs = encode(backbone, source.items, load, 64, ctx.progress, "features (source)")
            w, b, l2, scores = fit_head_with_l2_search(xs, source.labels, len(data.classes), list(L2_GRID),
                                                       cfg.l2, 200, ctx.seed)
            model = self.prepare(backbone, len(data.classes))
            set_linear(model.head, w, b)
            result = FitResult(model=model, details={"l2": l2, "l2_grid_holdout_accuracy": scores})
        else:
            result = self.trainer().fit(backbone, data, ctx)
            model = result.model
        n = recompute_bn_statistics(model.base, target_items, load, cfg.batch_size_stats, ctx.progress,
                                    "BN statistics (target)")
        result.model = model.eval()
        result.train_s = time.perf_counter() - t0
        result.examples_per_s = len(source) / max(result.train_s, 1e-9)
        result.details.update(bn_layers=n, target_examples=len(target_items), backbone=cfg.backbone)
        return result

    def trained_state(self, model: SpecialistModel) -> dict[str, torch.Tensor]:
        state = super().trained_state(model)
        for name, layer in bn_layers(model):  # the target statistics are what adabn produced
            for buf in BN_BUFFERS:
                if getattr(layer, buf, None) is not None:
                    state[f"{name}.{buf}"] = getattr(layer, buf).detach()
        return state

    def restore(self, backbone, num_classes: int, state: dict[str, torch.Tensor], folder) -> SpecialistModel:
        model = super().restore(backbone, num_classes, {k: v for k, v in state.items() if k.startswith("head.")}, folder)
        copy_state_into(model, state)
        return model.eval()
