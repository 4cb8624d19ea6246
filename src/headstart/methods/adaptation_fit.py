"""Run an adaptation loss through the base: the shared fit of `dann` and `coral` in every backbone mode."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data import Dataset
from ..engine.features import cached_features
from ..engine.two_domain import StepLoss, train_two_domains
from .adaptation import AdaptationMethod
from .base import FitContext, FitResult, SpecialistModel, loader_for

LrFactor = Callable[[float], float]


def fit_with_alignment(method: AdaptationMethod, backbone, data: Dataset, ctx: FitContext, *,
                       make_loss: Callable[[SpecialistModel], StepLoss], aux: nn.Module | None,
                       lr_factor: LrFactor, init_head: Callable[[SpecialistModel, torch.Tensor, list[int]], None] | None = None
                       ) -> FitResult:
    """Train `method`'s model on the labelled source + unlabelled target with the loss `make_loss(model)`.

    `aux` (e.g. a domain discriminator) trains beside the model at the head's rate and is not stored.
    `init_head(model, source_features, source_labels)` may initialise the head from frozen source features first.
    """
    cfg = method.config.resolved(backbone.kind)
    method.config, method._trainer = cfg, None  # the manifest records the values actually used
    torch.manual_seed(ctx.seed)
    source = data.split("train")
    target_items = method.target_items(ctx)
    model = method.prepare(backbone, len(data.classes))
    aux = aux if aux is not None else nn.Identity()
    load = loader_for(backbone.kind)
    frozen = cfg.backbone == "frozen"
    if frozen or init_head is not None:
        xs, _ = cached_features(model.base, source.items, load, 64, ctx.progress, ctx.use_cache)
        if init_head is not None:
            init_head(model, xs, source.labels)
    if frozen:
        xt, _ = cached_features(model.base, target_items, load, 64, ctx.progress, ctx.use_cache)

        def featurize(s_idx, t_idx):
            return xs[s_idx], xt[t_idx]

        def set_mode(epoch: int) -> None:
            model.eval()
            model.head.train()
            aux.train()

        groups = [{"params": list(model.head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay}]
    else:
        trainer = method.trainer()

        def featurize(s_idx, t_idx):
            items = [load(source.items[i]) for i in s_idx] + [load(target_items[i]) for i in t_idx]
            features = model.backbone(**model.collate(items, True))
            return features[:len(s_idx)], features[len(s_idx):]

        def set_mode(epoch: int) -> None:
            trainer.set_mode(model, epoch)
            aux.train()

        groups = trainer.param_groups(model, trainer.config.resolved(backbone.kind))
    groups.append({"params": list(aux.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay})
    groups = [g for g in groups if g["params"]]
    out = train_two_domains(nn.ModuleDict({"model": model, "aux": aux}), n_source=len(source),
                            source_labels=source.labels, n_target=len(target_items), featurize=featurize,
                            step_loss=make_loss(model), optimizer=torch.optim.AdamW(groups), lr_factor=lr_factor,
                            epochs=cfg.epochs, batch_size=cfg.batch_size, seed=ctx.seed, set_mode=set_mode,
                            checkpoint_dir=ctx.checkpoint_dir, resume=ctx.resume, fingerprint=ctx.fingerprint,
                            progress=ctx.progress, log=ctx.log)
    model.eval()
    return FitResult(model=model, history=out["history"], train_s=out["train_s"],
                     examples_per_s=out["examples_per_s"],
                     details={"target_examples": len(target_items), "backbone": cfg.backbone})
