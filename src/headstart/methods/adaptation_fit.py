"""Run an adaptation loss through the base: the shared fit of `dann` and `coral` in every backbone mode,
as a step loss over paired source/target batches on the one engine."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data import Dataset
from ..engine.batches import PairedDomains
from ..engine.checkpoint import Checkpointer
from ..engine.features import cached_features
from ..engine.schedule import LrSchedule
from ..engine.trainer import TrainSettings, train
from .adaptation import AdaptationMethod
from .base import FitContext, FitResult, SpecialistModel, loader_for

AlignmentLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, dict[str, float]]"]
"""(source features, source labels, target features, training progress) -> (loss, stats)."""


def fit_with_alignment(method: AdaptationMethod, backbone, data: Dataset, ctx: FitContext, *,
                       make_loss: Callable[[AdaptationMethod, SpecialistModel], AlignmentLoss], aux: nn.Module | None,
                       lr_schedule: LrSchedule,
                       init_head: Callable[[SpecialistModel, torch.Tensor, list[int]], None] | None = None
                       ) -> FitResult:
    """Train `method`'s model on the labelled source + unlabelled target with the loss `make_loss(method, model)`.

    `aux` (e.g. a domain discriminator) trains beside the model at the head's rate and is not stored.
    `init_head(model, source_features, source_labels)` may initialise the head from frozen source features first.
    There is no early stopping: without target labels nothing measures the target accuracy, and source
    accuracy selects for *less* adaptation -- the last epoch is kept.
    """
    method = method.resolved(backbone.kind)  # the caller's method object is never changed by a fit
    cfg = method.config
    torch.manual_seed(ctx.seed)
    source = data.split("train")
    target_items = method.target_items(ctx)
    model = method.prepare(backbone, len(data.classes))
    aux = aux if aux is not None else nn.Identity()
    load = loader_for(backbone.kind)
    xs = None
    if cfg.backbone == "frozen" or init_head is not None:
        xs, _ = cached_features(model.base, source.items, load, 64, ctx.progress, ctx.use_cache)
        if init_head is not None:
            init_head(model, xs, source.labels)
    if cfg.backbone == "frozen":
        featurize, set_mode, groups = _frozen(method, model, aux, xs, target_items, ctx)
    else:
        featurize, set_mode, groups = _through_base(method, model, aux, source, target_items)
    groups.append({"params": list(aux.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay})
    labels, loss_fn = torch.tensor(source.labels), make_loss(method, model)

    def step(batch, progress: float):
        s_idx, t_idx = batch
        fs, ft = featurize(s_idx, t_idx)
        loss, stats = loss_fn(fs, labels[s_idx].to(fs.device), ft, progress)
        return loss, stats, len(s_idx)

    out = train(nn.ModuleDict({"model": model, "aux": aux}),
                plan=PairedDomains(len(source), len(target_items), cfg.batch_size, cfg.epochs, ctx.seed),
                step_loss=step, param_groups=[g for g in groups if g["params"]],
                settings=TrainSettings(lr_schedule=lr_schedule), set_mode=set_mode,
                checkpoint=Checkpointer(ctx.checkpoint_dir, fingerprint=ctx.fingerprint, resume=ctx.resume),
                progress=ctx.progress, log=ctx.log)
    return FitResult(model=model.eval(), history=out.history, train_s=out.train_s, examples_per_s=out.per_s,
                     is_main_process=out.is_main_process, config=cfg, training=out.training_facts(),
                     details={"target_examples": len(target_items), "backbone": cfg.backbone})


def _frozen(method, model: SpecialistModel, aux: nn.Module, xs: torch.Tensor, target_items, ctx):
    """Rows of cached features of the untouched base; only the head (and `aux`) train."""
    load = loader_for(model.base.kind)
    xt, _ = cached_features(model.base, target_items, load, 64, ctx.progress, ctx.use_cache)

    def featurize(s_idx, t_idx):
        device = next(model.head.parameters()).device
        return xs[s_idx].to(device), xt[t_idx].to(device)

    def set_mode(epoch: int) -> None:
        model.eval()
        model.head.train()
        aux.train()

    cfg = method.config
    return featurize, set_mode, [{"params": list(model.head.parameters()), "lr": cfg.head_lr,
                                  "weight_decay": cfg.weight_decay}]


def _through_base(method, model: SpecialistModel, aux: nn.Module, source, target_items):
    """One forward pass through the (LoRA / partly unfrozen) base over the concatenated source and target
    batch, so BatchNorm sees both domains as in DANN/TLlib."""
    load, trainer = loader_for(model.base.kind), method.trainer()

    def featurize(s_idx, t_idx):
        items = [load(source.items[i]) for i in s_idx] + [load(target_items[i]) for i in t_idx]
        device = next(model.head.parameters()).device
        batch = model.collate(items, True)
        features = model.backbone(**{k: v.to(device) for k, v in batch.items()})
        return features[:len(s_idx)], features[len(s_idx):]

    def set_mode(epoch: int) -> None:
        trainer.set_mode(model, epoch)
        aux.train()

    return featurize, set_mode, trainer.param_groups(model, trainer.config.resolved(model.base.kind))
