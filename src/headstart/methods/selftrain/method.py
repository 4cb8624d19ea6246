from __future__ import annotations

import time
from dataclasses import replace

import torch

from ...core.metrics import class_shares
from ...data import Dataset, Split
from ...engine.checkpoint import Checkpointer
from ...engine.features import cached_features
from ..adaptation import AdaptationMethod
from ..base import FitContext, FitResult, SpecialistModel, loader_for
from ..heads import L2_GRID, set_linear
from ..probe.method import fit_head_with_l2_search
from ..training import LoopConfig, train_classifier
from .config import SelftrainConfig


def select_pseudo_labels(probs: torch.Tensor, source_prior: torch.Tensor, threshold: float,
                         share: float) -> tuple[list[int], list[int]]:
    """(target indices, pseudo labels): confident predictions, at most share * prior_c * N per class.

    probs [N, C] on the target; source_prior [C] sums to 1. Within a class the most confident go first.
    """
    conf, pred = probs.max(-1)
    chosen, labels = [], []
    for c in range(probs.shape[1]):
        idx = ((pred == c) & (conf >= threshold)).nonzero().flatten()
        quota = int(share * float(source_prior[c]) * probs.shape[0])
        idx = idx[conf[idx].argsort(descending=True)][:quota]
        chosen += idx.tolist()
        labels += [c] * len(idx)
    return chosen, labels


class Selftrain(AdaptationMethod):
    """Self-training on confident, class-balanced target pseudo-labels, iterated (frozen, lora or finetune)."""

    config: SelftrainConfig

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        cfg = self.config.resolved(backbone.kind)
        rounds = cfg.rounds or (3 if cfg.backbone == "frozen" else 1)
        method = self.resolved(backbone.kind, rounds=rounds)  # a copy: this method object is never changed
        source, target_items = data.split("train"), self.target_items(ctx)
        prior = class_shares(source.labels, len(data.classes))
        fit_mode = method._fit_frozen if cfg.backbone == "frozen" else method._fit_trained
        result = fit_mode(backbone, data, source, target_items, prior, rounds, ctx)
        result.config = method.config  # what the manifest records
        return result

    def _select(self, probs, prior, r, rounds, history, ctx) -> tuple[list[int], list[int]]:
        share = self.config.max_share * r / rounds
        idx, labels = select_pseudo_labels(probs, prior, self.config.threshold, share)
        counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=probs.shape[1]).tolist()
        history.append({"round": r, "pseudo_labels": len(idx), "per_class": counts,
                        "mean_confidence": probs.max(-1).values.mean().item()})
        ctx.log(f"selftrain round {r}/{rounds}: {len(idx)} of {len(probs)} target examples pseudo-labelled "
                f"(per class {counts})")
        return idx, labels

    def _fit_frozen(self, backbone, data, source: Split, target_items, prior, rounds, ctx) -> FitResult:
        t0 = time.perf_counter()
        load = loader_for(backbone.kind)
        xs, _ = cached_features(backbone, source.items, load, 64, ctx.progress, ctx.use_cache)
        xt, _ = cached_features(backbone, target_items, load, 64, ctx.progress, ctx.use_cache)
        grid = list(L2_GRID)
        w, b, l2, _ = fit_head_with_l2_search(xs, source.labels, len(data.classes), grid, self.config.l2, 200, ctx.seed)
        history: list[dict] = []
        for r in range(1, rounds + 1):
            probs = (xt @ w.T + b).softmax(-1)
            idx, pseudo = self._select(probs, prior, r, rounds, history, ctx)
            # The source holdout picked l2 once; refits on source + pseudo-labels keep it.
            w, b, _, _ = fit_head_with_l2_search(torch.cat([xs, xt[idx]]), source.labels + pseudo,
                                                 len(data.classes), grid, l2, 200, ctx.seed)
        model = self.prepare(backbone, len(data.classes))
        set_linear(model.head, w, b)
        train_s = time.perf_counter() - t0
        return FitResult(model=model.eval(), history=history, train_s=train_s,
                         examples_per_s=len(source) / max(train_s, 1e-9),
                         details={"l2": l2, "rounds": rounds, "target_examples": len(target_items),
                                  "pseudo_labels": history[-1]["pseudo_labels"], "backbone": "frozen"})

    def _fit_trained(self, backbone, data, source: Split, target_items, prior, rounds, ctx) -> FitResult:
        trainer = self.trainer()
        first = trainer.fit(backbone, data, ctx)  # round 0: the source-only model
        model, tcfg = first.model, first.config
        history: list[dict] = [{"round": 0, **row} for row in first.history]
        train_s = first.train_s
        load = loader_for(backbone.kind)
        rounds_done: list = []
        for r in range(1, rounds + 1):
            probs = _predict(model, target_items, load, tcfg.batch_size * 2)
            idx, pseudo = self._select(probs, prior, r, rounds, history, ctx)
            mixed = Split(source.items + [target_items[i] for i in idx], source.labels + pseudo)
            loop_cfg = LoopConfig(epochs=tcfg.epochs, batch_size=tcfg.batch_size, seed=ctx.seed + r,
                                  warmup_ratio=tcfg.warmup_ratio, patience=0, label_smoothing=tcfg.label_smoothing)
            ckpt = ctx.checkpoint_dir.with_name(f"{ctx.checkpoint_dir.name}-round{r}") if ctx.checkpoint_dir else None
            out, _ = train_classifier(model, train_split=mixed, val=None, load=load,
                                      param_groups=trainer.param_groups(model, tcfg), cfg=loop_cfg,
                                      set_mode=lambda epoch: trainer.set_mode(model, epoch),
                                      ctx=replace(ctx, checkpoint_dir=ckpt))
            history += [{"round": r, **row} for row in out.history]
            train_s += out.train_s
            rounds_done.append(ckpt)
        if first.is_main_process:  # the run is done: the rounds' resume checkpoints are spent
            for ckpt in rounds_done:
                Checkpointer(ckpt).discard()
        model.eval()
        return FitResult(model=model, history=history, train_s=train_s, examples_per_s=first.examples_per_s,
                         training=first.training, is_main_process=first.is_main_process,
                         details={"rounds": rounds, "target_examples": len(target_items),
                                  "pseudo_labels": len(idx), "backbone": self.config.backbone})


@torch.no_grad()
def _predict(model: SpecialistModel, items, load, batch_size: int) -> torch.Tensor:
    model.eval()
    out = [model(**model.collate([load(x) for x in items[i:i + batch_size]], False)).float().softmax(-1)
           for i in range(0, len(items), batch_size)]
    return torch.cat(out)
