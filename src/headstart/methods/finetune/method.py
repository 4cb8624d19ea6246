from __future__ import annotations

import dataclasses

from ...engine.features import extraction_batch
from ...engine.memory import MemoryPlan
from ...engine.perf import tune_allocator
from ...engine.schedule import layerwise_param_groups
from ..base import FitContext, SpecialistModel
from ..training import TrainedMethod
from .config import FinetuneConfig
from .memory import plan_training


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

    def plan_memory(self, model: SpecialistModel, train_split, load, cfg: FinetuneConfig,
                    ctx: FitContext) -> MemoryPlan:
        """The micro-batch that fits the budget with every block open, the allocator setting, the eval batch."""
        self.set_mode(model, cfg.epochs - 1)  # the last epoch has every block open: the most memory
        plan = plan_training(model, model.collate([load(train_split.items[0])], False), cfg.batch_size,
                             ctx.memory_budget, ctx.log)
        tune_allocator(plan.budget, plan.estimate)
        return dataclasses.replace(plan, eval_batch=extraction_batch(model.base, 64, plan.budget))
