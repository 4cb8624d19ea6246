from __future__ import annotations

import torch

from ...data import Dataset
from ...engine.batches import EpochShuffle
from ...engine.checkpoint import Checkpointer
from ...engine.features import extraction_batch
from ...engine.perf import tune_allocator
from ...engine.schedule import layerwise_param_groups, warmup_cosine_schedule
from ...engine.trainer import TrainSettings, train
from ..base import FitContext, FitResult, SpecialistModel, loader_for
from ..training import BestEpoch, TrainedMethod, cross_entropy_step, evaluate_split, init_head_from_probe
from .config import FinetuneConfig
from .memory import accumulating, plan_training


class Finetune(TrainedMethod):
    """Fine-tune the top N blocks (or all) with layer-wise learning rates, warm-up + cosine, early stopping."""

    config: FinetuneConfig
    plans_memory = True
    """The task leaves the allocator alone: `fit` chooses it, with the micro-batch, from the memory budget."""

    def prepare(self, backbone, num_classes: int, cfg: FinetuneConfig) -> SpecialistModel:
        model = SpecialistModel(backbone, num_classes)
        for p in backbone.parameters():
            p.requires_grad_(False)
        return model

    def param_groups(self, model: SpecialistModel, cfg: FinetuneConfig) -> list[dict]:
        # Only the blocks that may ever train get a group: frozen blocks never enter the optimizer.
        blocks = model.base.blocks()
        n_train = cfg.blocks_to_train(len(blocks))
        trainable = blocks[len(blocks) - n_train:] if n_train else []
        return layerwise_param_groups(trainable, model.head, cfg.lr, cfg.head_lr, cfg.layer_decay, cfg.weight_decay)

    def set_mode(self, model: SpecialistModel, epoch: int) -> None:
        """Train mode for the unfrozen top blocks and the head; frozen blocks (and BN statistics) stay in eval."""
        blocks = model.base.blocks()
        n_train = self.config.blocks_to_train(len(blocks))
        n_open = min(n_train, epoch + 1) if self.config.gradual_unfreeze else n_train
        model.train()
        for i, (_, block) in enumerate(blocks):
            is_open = i >= len(blocks) - n_open
            for p in block.parameters():
                p.requires_grad_(is_open)
            if not is_open:
                block.eval()
        if self.config.bn_stats == "frozen":
            model.base.freeze_batchnorm()

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        """TrainedMethod's fit with a memory plan: each batch runs in micro-batches that fit the budget."""
        method = self.resolved(backbone.kind)  # a copy: this method object is never changed by a fit
        cfg = method.config
        torch.manual_seed(ctx.seed)
        model = method.prepare(backbone, len(data.classes), cfg)
        train_split, val = data.selection_splits(ctx.seed, cfg.early_stopping)
        load = loader_for(backbone.kind)
        if cfg.head_init == "probe":
            init_head_from_probe(model, train_split, len(data.classes), ctx)
        groups = method.param_groups(model, cfg)
        method.set_mode(model, cfg.epochs - 1)  # the last epoch has every block open: the most memory
        plan = plan_training(model, model.collate([load(train_split.items[0])], False), cfg.batch_size,
                             ctx.memory_budget, ctx.log)
        tune_allocator(plan.budget, plan.estimate)
        evaluate = None
        if val is not None and len(val):  # inference: its batch is planned like feature extraction's
            evaluate = lambda: evaluate_split(model, val, load, extraction_batch(model.base, 64, plan.budget),  # noqa: E731
                                              cfg.label_smoothing)
        best = BestEpoch(evaluate, cfg.patience, cfg.epochs, ctx.log)
        out = train(model, plan=EpochShuffle(len(train_split), cfg.batch_size, cfg.epochs, ctx.seed),
                    step_loss=accumulating(cross_entropy_step(model, train_split, load, cfg.label_smoothing),
                                           plan.micro_batch),
                    param_groups=groups, hooks=[best], set_mode=lambda epoch: method.set_mode(model, epoch),
                    settings=TrainSettings(lr_schedule=warmup_cosine_schedule(cfg.warmup_ratio), grad_clip=1.0,
                                           loss_key="train_loss"),
                    checkpoint=Checkpointer(ctx.checkpoint_dir, fingerprint=ctx.fingerprint, resume=ctx.resume),
                    progress=ctx.progress, log=ctx.log)
        return FitResult(model=model.eval(), history=out.history, train_s=out.train_s, examples_per_s=out.per_s,
                         is_main_process=out.is_main_process, config=cfg, training=out.training_facts(),
                         details={"best_epoch": best.best["epoch"], "selection_examples": len(val) if val else 0,
                                  "num_processes": out.num_processes, "micro_batch": plan.micro_batch,
                                  "memory_estimate_mb": plan.estimate // (1 << 20)})
