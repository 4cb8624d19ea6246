"""Classification on the one engine: a cross-entropy step loss, validation with best-epoch selection and
early stopping as a hook, and `TrainedMethod`, the base of finetune / lora / scratch."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..data import Dataset, Split
from ..engine.batches import EpochShuffle
from ..engine.checkpoint import Checkpointer, copy_state_into, trainable_state
from ..engine.memory import MemoryPlan
from ..engine.schedule import layerwise_param_groups, warmup_cosine_schedule
from ..engine.trainer import Hook, RunState, TrainResult, TrainSettings, train
from .base import FitContext, FitResult, Method, SpecialistModel, TrainConfig, loader_for
from .heads import set_linear


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    seed: int = 0
    warmup_ratio: float = 0.1
    patience: int = 3
    """Stop after this many epochs without a better validation accuracy (0 = never stop early)."""
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    eval_batch_size: int = 64
    micro_batch: int = 0
    """Examples per forward, the rest of the batch accumulated (0: the whole batch at once)."""


def cross_entropy_step(model: SpecialistModel, split: Split, load: Callable, label_smoothing: float = 0.0,
                       outputs: dict | None = None):
    """The step loss of classification: logits of this share of the batch against its labels.

    `outputs`: a dict the step fills with this share's `logits` and `idx` (indices into `split`) for hooks
    that need them (distillation reads the student's logits there instead of running the model twice).
    """
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def step(idx: list[int], progress: float):
        device = next(model.parameters()).device
        batch = model.collate([load(split.items[i]) for i in idx], True)
        labels = torch.tensor([split.labels[i] for i in idx], device=device)
        logits = model(**{k: v.to(device) for k, v in batch.items()})
        if outputs is not None:
            outputs.update(logits=logits, idx=list(idx))
        return loss_fn(logits.float(), labels), {}, len(idx)

    return step


@torch.no_grad()
def evaluate_split(model: SpecialistModel, split: Split, load: Callable, batch_size: int,
                   label_smoothing: float = 0.0) -> dict[str, float]:
    """Accuracy and mean loss on a labelled split (every process evaluates all of it: same decision everywhere)."""
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="sum")
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(split), batch_size):
        idx = range(start, min(len(split), start + batch_size))
        batch = model.collate([load(split.items[i]) for i in idx], False)
        labels = torch.tensor([split.labels[i] for i in idx], device=device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).float()
        loss_sum += loss_fn(logits, labels).item()
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    n = max(1, len(split))
    return {"val_accuracy": correct / n, "val_loss": loss_sum / n}


class BestEpoch(Hook):
    """Validate after every epoch, keep the best epoch's weights, stop after `patience` epochs without a gain.
    Without a validation split, the last epoch is the one kept."""

    name = "best"

    def __init__(self, evaluate: Callable[[], dict[str, float]] | None, patience: int, epochs: int,
                 log: Callable[[str], None] = print):
        self.evaluate, self.patience, self.epochs, self.log = evaluate, patience, epochs, log
        self.best = {"epoch": -1, "val_accuracy": -1.0, "val_loss": float("inf")}
        self.without_gain = 0
        self.weights: dict[str, torch.Tensor] | None = None

    def end_of_epoch(self, run: RunState, row: dict[str, Any]) -> bool:
        if self.evaluate is None:
            self.best["epoch"] = run.epoch + 1
            return False
        row.update(self.evaluate())
        # Small validation sets tie on accuracy often: the lower loss breaks the tie.
        if (row["val_accuracy"], -row["val_loss"]) > (self.best["val_accuracy"], -self.best["val_loss"]):
            self.best = {"epoch": run.epoch + 1, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
            self.weights = {k: v.detach().clone() for k, v in trainable_state(run.model).items()}
            self.without_gain = 0
        else:
            self.without_gain += 1
        stop = bool(self.patience) and self.without_gain >= self.patience
        if stop and run.epoch + 1 < self.epochs:
            self.log(f"early stop after epoch {run.epoch + 1}: no better validation accuracy for {self.patience} epochs")
        return stop

    def finish(self, run: RunState) -> None:
        if self.weights is not None:
            copy_state_into(run.model, self.weights, what="best-epoch weights")

    def state(self):
        return {"best": self.best, "without_gain": self.without_gain}, self.weights or {}

    def load_state(self, state, tensors) -> None:
        if state:
            self.best, self.without_gain = state["best"], state["without_gain"]
        self.weights = tensors or None


def train_classifier(model: SpecialistModel, *, train_split: Split, val: Split | None, load: Callable,
                     param_groups: list[dict], cfg: LoopConfig, set_mode: Callable[[int], None], ctx: FitContext,
                     hooks: Sequence[Hook] = (), outputs: dict | None = None) -> tuple[TrainResult, int]:
    """Cross-entropy training with validation-based best-epoch selection; returns (result, best epoch).
    `outputs`: see `cross_entropy_step` (hooks that read the step's logits share it)."""
    evaluate = None
    if val is not None and len(val):
        evaluate = lambda: evaluate_split(model, val, load, cfg.eval_batch_size, cfg.label_smoothing)  # noqa: E731
    best = BestEpoch(evaluate, cfg.patience, cfg.epochs, ctx.log)
    result = train(model, plan=EpochShuffle(len(train_split), cfg.batch_size, cfg.epochs, cfg.seed),
                   step_loss=cross_entropy_step(model, train_split, load, cfg.label_smoothing, outputs),
                   param_groups=param_groups,
                   settings=TrainSettings(lr_schedule=warmup_cosine_schedule(cfg.warmup_ratio),
                                          grad_clip=cfg.grad_clip, loss_key="train_loss", micro_batch=cfg.micro_batch),
                   hooks=[*hooks, best], set_mode=set_mode,
                   checkpoint=Checkpointer(ctx.checkpoint_dir, fingerprint=ctx.fingerprint, resume=ctx.resume),
                   progress=ctx.progress, log=ctx.log)
    return result, best.best["epoch"]


class TrainedMethod(Method):
    """A method whose training runs through the engine: prepare a model, give its parameter groups and
    train mode per epoch (finetune, lora, scratch)."""

    def prepare(self, backbone, num_classes: int, cfg: TrainConfig) -> SpecialistModel:
        raise NotImplementedError

    def param_groups(self, model: SpecialistModel, cfg: TrainConfig) -> list[dict]:
        return layerwise_param_groups(model.base.blocks(), model.head, cfg.lr, cfg.head_lr, 1.0, cfg.weight_decay)

    def set_mode(self, model: SpecialistModel, epoch: int) -> None:
        model.train()

    def plan_memory(self, model: SpecialistModel, train_split: Split, load: Callable, cfg: TrainConfig,
                    ctx: FitContext) -> MemoryPlan | None:
        """Micro-batch and eval batch within `ctx.memory_budget`, decided before training (None: the whole
        batch per forward, as configured). Finetune measures and plans (methods/finetune/memory.py)."""
        return None

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        method = self.resolved(backbone.kind)  # a copy: this method object is never changed by a fit
        cfg = method.config
        torch.manual_seed(ctx.seed)
        model = method.prepare(backbone, len(data.classes), cfg)
        train_split, val = data.selection_splits(ctx.seed, cfg.early_stopping)
        load = loader_for(backbone.kind)
        if cfg.head_init == "probe":
            init_head_from_probe(model, train_split, len(data.classes), ctx)
        plan = method.plan_memory(model, train_split, load, cfg, ctx)
        loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=ctx.seed, warmup_ratio=cfg.warmup_ratio,
                          patience=cfg.patience, label_smoothing=cfg.label_smoothing,
                          micro_batch=plan.micro_batch if plan and plan.accumulation > 1 else 0,
                          eval_batch_size=plan.eval_batch if plan and plan.eval_batch else 64)
        out, best_epoch = train_classifier(model, train_split=train_split, val=val, load=load,
                                           param_groups=method.param_groups(model, cfg), cfg=loop,
                                           set_mode=lambda epoch: method.set_mode(model, epoch), ctx=ctx,
                                           hooks=ctx.hooks)
        memory = {"micro_batch": plan.micro_batch, "memory_estimate_mb": plan.estimate >> 20} if plan else {}
        return FitResult(model=model.eval(), history=out.history, train_s=out.train_s, examples_per_s=out.per_s,
                         is_main_process=out.is_main_process, config=cfg, training=out.training_facts(),
                         details={"best_epoch": best_epoch, "selection_examples": len(val) if val else 0,
                                  "num_processes": out.num_processes, **memory})

    def resolved(self, kind: str) -> "TrainedMethod":
        """A copy of this method with its config's defaults for the base kind filled in."""
        other = copy.copy(self)
        other.config = self.config.resolved(kind)
        return other


def init_head_from_probe(model: SpecialistModel, train_split: Split, num_classes: int, ctx: FitContext) -> None:
    """LP-FT: the head starts as a linear probe on the untouched base's features (a fresh LoRA adapter is a no-op)."""
    from ..engine.features import cached_features
    from .probe.method import fit_linear_head

    x, _ = cached_features(model.base, train_split.items, loader_for(model.base.kind), 64, ctx.progress, ctx.use_cache)
    w, b = fit_linear_head(x, torch.tensor(train_split.labels), num_classes, l2=1e-2)
    set_linear(model.head, w, b)
