"""How a classifier specialist learns one more night: its head grows for new labels, then it trains on
the engine with the chosen strategies as hooks.

Two paths, by what the update may change:
- **head only** (probe, prototype, setfit): the body is fixed, so examples are its features; the head
  trains on them with the engine (warm-started from the previous head). Features come from the frozen
  base's cache (probe) or from the specialist's own tuned body (setfit), and a `features` memory holds
  exactly what the head reads.
- **body and head** (finetune, lora): the examples themselves pass through the model, with the method's
  own parameter groups and train modes (`methods.training.train_classifier`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data import Split, loader_for
from ..engine.batches import EpochShuffle
from ..engine.checkpoint import Checkpointer
from ..engine.schedule import warmup_cosine_schedule
from ..engine.trainer import Hook, RunState, TrainSettings, train
from ..methods.base import FitContext, SpecialistModel
from ..methods.heads import set_linear
from ..methods.training import LoopConfig, train_classifier
from .memory import ExampleSet


@dataclass
class HeadTraining:
    """How a head learns on features during an update (head-only specialists)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 1e-4


@dataclass
class Readable:
    """Examples in the form the model reads: features (head only) or items, with label indices."""

    labels: list[int]
    features: torch.Tensor | None = None
    items: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def concat(self, other: "Readable") -> "Readable":
        if not len(other):
            return self
        if not len(self):
            return other
        feats = None if self.features is None else torch.cat([self.features, other.features])
        items = None if self.items is None else self.items + other.items
        return Readable(self.labels + other.labels, feats, items)


class TimeBudget(Hook):
    """Stops training at the first epoch end past the budget (a nightly job must end)."""

    name = "time_budget"

    def __init__(self, seconds: float, log: Callable[[str], None]):
        import time

        self.deadline, self.log, self.clock = time.monotonic() + seconds, log, time.monotonic

    def end_of_epoch(self, run: RunState, row: dict[str, Any]) -> bool:
        if self.clock() > self.deadline:
            self.log(f"time budget reached after epoch {run.epoch + 1}: stopping there")
            return True
        return False


class ClassifierLearner:
    """One specialist being updated: reads examples, grows its head, trains, measures."""

    def __init__(self, spec, ctx: FitContext):
        self.spec, self.ctx = spec, ctx
        self.model: SpecialistModel = spec.model
        self.kind = self.model.base.kind
        self.head_only = bool(spec.method.frozen_base) or spec.method.name == "setfit"
        self.load = loader_for(self.kind)

    @property
    def classes(self) -> list[str]:
        return self.spec.classes

    # ---- examples ------------------------------------------------------------------------------
    def features(self, items: list[Any]) -> torch.Tensor:
        """What the head reads: frozen-base features (cached on disk), or the tuned body's embeddings."""
        from ..engine.features import cached_features, encode

        if not items:
            return torch.zeros(0, self.model.base.feature_dim)
        if self.spec.method.frozen_base:
            x, _ = cached_features(self.model.base, items, self.load, 64, self.ctx.progress, self.ctx.use_cache)
            return x
        return encode(self.model.backbone, items, self.load, 64, self.ctx.progress, desc="embeddings")

    def readable(self, items: list[Any], labels: list[str], features: torch.Tensor | None = None) -> Readable:
        index = {c: i for i, c in enumerate(self.classes)}
        ys = [index[y] for y in labels]
        if self.head_only:
            return Readable(ys, features if features is not None else self.features(items))
        return Readable(ys, items=list(items))

    def with_features(self, examples: ExampleSet, items: list[Any]) -> ExampleSet:
        """The same examples with their features attached (store `features`)."""
        examples.features = self.features(items).float()
        return examples

    # ---- the head ------------------------------------------------------------------------------
    def head_input(self, features: torch.Tensor) -> torch.Tensor:
        """What the head's matrix multiplies: the features, centred and normalised for a cosine head."""
        if self.model.normalize:
            return F.normalize(features.float() - self.model.center, dim=-1)
        return features.float()

    def input_scale(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, sd) of the head's inputs over `features`: the standardisation of `standardize`."""
        h = self.head_input(features)
        return h.mean(0), (h.std(0).clamp_min(1e-6) if len(h) > 1 else torch.ones(h.shape[1]))

    def standardize(self, scale: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Head-only training happens on standardised head inputs z = (h - mu) / sd, as the probe fits
        (fit_linear_head): frozen features are tiny and correlated (MiniLM's dims have sd ~0.05), so a
        step size that suits z would not move a raw-space head. The scale is the lineage's own, fixed
        from its first night on (the memory carries it): standardising by each new night's statistics
        would reshape the optimisation around the newest classes every night. `unstandardize` folds back."""
        mu, sd = scale
        w, b = self.model.head.weight.detach(), self.model.head.bias.detach()
        self.scale = (mu, sd)
        self.zhead = torch.nn.Linear(w.shape[1], w.shape[0])
        set_linear(self.zhead, w * sd, b + w @ mu)

    def to_z(self, tensors: dict[str, torch.Tensor], fisher: bool = False) -> dict[str, torch.Tensor]:
        """Raw-space head anchors (or their Fisher) in z-space: W_z = W sd, b_z = b + W mu; since
        dL/dW_z = dL/dW / sd, the Fisher of W_z is F_W / sd^2 (the bias's is unchanged)."""
        mu, sd = self.scale
        w, b = tensors["head.weight"], tensors["head.bias"]
        if fisher:
            return {"head.weight": w / sd.square(), "head.bias": b.clone()}
        return {"head.weight": w * sd, "head.bias": b + w @ mu}

    def z(self, features: torch.Tensor) -> torch.Tensor:
        mu, sd = self.scale
        return (self.head_input(features) - mu) / sd

    def unstandardize(self) -> None:
        mu, sd = self.scale
        wz, bz = self.zhead.weight.detach(), self.zhead.bias.detach()
        w = wz / sd
        grown = torch.nn.Linear(w.shape[1], w.shape[0])
        set_linear(grown, w, bz - w @ mu)
        self.model.head = grown
        self.zhead = None

    def grow(self, labels: list[str], night: Readable | None = None, night_labels: list[str] | None = None) -> list[str]:
        """Add head rows for labels never seen; returns the new ones; the old rows are untouched. A new row
        is imprinted (Qi et al. 2018) on standardised inputs: its class's mean input, scaled to the old rows'
        norm, with the old rows' mean bias -- then folded back to the head's input space. Standardising
        first is what calibrates it: imprinted on raw, uncentred features (a LoRA body's), one new banking77
        intent took a third of all predictions and night 1 fell 94 -> 33 even with replay. (Fitting the new
        rows against the old ones instead made them win everywhere: naive/l2sp/ewc/lwf fell to ~20%.)"""
        new = [c for c in dict.fromkeys(labels) if c not in self.classes]
        if not new:
            return []
        head = self.zhead if getattr(self, "zhead", None) is not None else self.model.head
        old_w, old_b = head.weight.detach().float(), head.bias.detach().float()
        grown_classes = self.classes + new
        if night is not None and night_labels is not None:
            inputs = self._inputs(night).float()
            y = torch.tensor([grown_classes.index(c) for c in night_labels])
            new_w, new_b = imprint_rows(inputs, y, old_w.cpu(), old_b.cpu(), len(new))
        else:
            new_w, new_b = torch.zeros(len(new), old_w.shape[1]), old_b.mean().repeat(len(new)).cpu()
        grown = torch.nn.Linear(old_w.shape[1], old_w.shape[0] + len(new)).to(old_w.device)
        set_linear(grown, torch.cat([old_w, new_w.to(old_w)]), torch.cat([old_b, new_b.to(old_b)]))
        if head is self.model.head:
            self.model.head = grown
        else:
            self.zhead = grown
        self.spec.classes = grown_classes
        return new

    def _inputs(self, night: Readable) -> torch.Tensor:
        """The inputs the head being trained reads."""
        if getattr(self, "zhead", None) is not None:
            return self.z(night.features)
        feats = night.features if night.features is not None else self.features(list(night.items))
        return self.head_input(feats)

    # ---- measuring ----------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, data: Readable) -> torch.Tensor:
        self.model.eval()
        if data.features is not None:
            return self.model.classify(data.features).float()
        out = [self.model(**self.model.collate([self.load(x) for x in data.items[i:i + 64]], False)).float()
               for i in range(0, len(data), 64)]
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def accuracy(self, data: Readable) -> float | None:
        """Accuracy in points (0-100); None for an empty set."""
        if not len(data):
            return None
        pred = self.logits(data).argmax(-1)
        return 100.0 * (pred == torch.tensor(data.labels)).float().mean().item()

    # ---- training -----------------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters an update trains: the head, and the method's own (LoRA adapters, top blocks)."""
        if self.head_only:
            head = self.zhead if getattr(self, "zhead", None) is not None else self.model.head
            return dict(head.named_parameters(prefix="head"))
        from .fresh_adapter import adapter_trains

        for name, p in self.model.named_parameters():
            if "lora_" in name:  # a restored PEFT adapter comes back frozen (inference mode); with a fresh
                p.requires_grad_(adapter_trains(self.model.backbone, name))  # adapter only it trains
        groups = self._method_groups()
        ids = {id(p) for g in groups for p in g["params"]}
        return {n: p for n, p in self.model.named_parameters() if id(p) in ids}

    def _method_groups(self) -> list[dict]:
        method = self.spec.method.resolved(self.kind)
        return method.param_groups(self.model, method.config)

    def train(self, data: Readable, hooks: list[Hook], outputs: dict, anchored: set[str], seed: int,
              head: HeadTraining, epochs: int | None = None) -> list[dict]:
        """Train on `data` with `hooks`; the anchored parameters (L2-SP/EWC) get no weight decay."""
        from .strategies import without_weight_decay

        params = self.trainable()
        if self.head_only:
            groups = [{"params": list(params.values()), "lr": head.lr, "weight_decay": head.weight_decay}]
            groups = without_weight_decay(groups, [params[n] for n in anchored if n in params])
            return self._train_head(data, groups, hooks, outputs, seed,
                                    head if epochs is None else HeadTraining(epochs=epochs))
        method = self.spec.method.resolved(self.kind)
        groups = without_weight_decay(method.param_groups(self.model, method.config),
                                      [params[n] for n in anchored if n in params])
        cfg = method.config
        loop = LoopConfig(epochs=epochs or cfg.epochs, batch_size=cfg.batch_size, seed=seed, warmup_ratio=cfg.warmup_ratio,
                          patience=0, label_smoothing=cfg.label_smoothing)
        result, _ = train_classifier(self.model, train_split=Split(list(data.items), list(data.labels)), val=None,
                                     load=self.load, param_groups=groups, cfg=loop,
                                     set_mode=lambda epoch: method.set_mode(self.model, epoch), ctx=self.ctx,
                                     hooks=hooks, outputs=outputs)
        self.model.eval()
        return result.history

    def _train_head(self, data: Readable, groups, hooks, outputs, seed: int, head: HeadTraining) -> list[dict]:
        """The z-space head (see `standardize`) on the engine; folded back into the model's head after."""
        x, y = self.z(data.features), torch.tensor(data.labels)
        model = self.zhead

        def step(idx: list[int], progress: float):
            logits = model(x[idx].to(model.weight.device))
            outputs.update(logits=logits, idx=list(idx))
            return F.cross_entropy(logits.float(), y[idx].to(logits.device)), {}, len(idx)

        result = train(model, plan=EpochShuffle(len(data), head.batch_size, head.epochs, seed), step_loss=step,
                       param_groups=groups, settings=TrainSettings(lr_schedule=warmup_cosine_schedule(0.1),
                                                                   loss_key="train_loss"),
                       hooks=hooks, set_mode=lambda epoch: model.train(),
                       checkpoint=Checkpointer(self.ctx.checkpoint_dir, fingerprint=self.ctx.fingerprint,
                                               resume=self.ctx.resume),
                       progress=self.ctx.progress, log=self.ctx.log)
        self.unstandardize()
        return result.history

    # ---- what EWC needs -----------------------------------------------------------------------
    def fisher(self, data: Readable, max_examples: int, seed: int) -> dict[str, torch.Tensor]:
        """The true diagonal Fisher of the trainable parameters on `data` (labels sampled from the model)."""
        from .fisher import classifier_sampled_nll, fisher_diagonal, head_fisher

        if self.head_only:  # raw-space Fisher of the head on its inputs (exact expectation over labels)
            f = head_fisher(self.head_input(data.features), self.model.head.weight.detach(),
                            self.model.head.bias.detach(), max_examples=max_examples, seed=seed)
            return {f"head.{k}": v for k, v in f.items()}
        return fisher_diagonal(self.trainable(), classifier_sampled_nll(self.model, data.items, self.load), len(data),
                               max_examples, seed, model=self.model)


def imprint_rows(x: torch.Tensor, y: torch.Tensor, old_w: torch.Tensor, old_b: torch.Tensor,
                 n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for `n_new` classes (label indices after the old ones) of a linear head on inputs `x`: in the
    standardised space z = (x - mean) / sd the row is the class's mean z, at the old rows' mean norm there,
    with their mean bias; folded back to x's space. Returns (W_new [n_new, D], b_new [n_new])."""
    x = x.double()
    mean, sd = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    z = (x - mean) / sd
    wz_old, bz_old = old_w.double() * sd, old_b.double() + old_w.double() @ mean  # the old rows in z-space
    norm, n_old = wz_old.norm(dim=1).mean(), old_w.shape[0]
    rows = [F.normalize(z[y == n_old + k].mean(0), dim=0) * norm if (y == n_old + k).any()
            else torch.zeros(x.shape[1], dtype=x.dtype) for k in range(n_new)]
    wz = torch.stack(rows)
    w = wz / sd
    return w.float(), (bz_old.mean() - w @ mean).float()
