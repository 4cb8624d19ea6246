"""The training loop for adaptation losses that need a source and a target batch at every step (dann, coral).

Each step draws a labelled source batch and an unlabelled target batch, asks the method for its
loss (`step_loss(source_features, source_labels, target_features, progress)`), and steps the
optimizer; `featurize` turns the two index lists into features (rows of cached features in frozen
mode, a forward pass through the base otherwise, one concatenated batch so BatchNorm sees both
domains as in DANN/TLlib). An epoch is one pass over the source; the target is cycled with its own
seeded shuffle. There is no early stopping: without target labels nothing measures the target
accuracy, and source accuracy selects for *less* adaptation -- the last epoch is kept.

Checkpoints (per epoch, safetensors + JSON, via engine.checkpoint) make `resume` continue an
interrupted run after its last complete epoch.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import TrainingError
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .loop import trainable_state

StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, dict[str, float]]]


def train_two_domains(modules: nn.ModuleDict, *, n_source: int, source_labels: list[int], n_target: int,
                      featurize: Callable[[list[int], list[int]], tuple[torch.Tensor, torch.Tensor]],
                      step_loss: StepLoss, optimizer: torch.optim.Optimizer,
                      lr_factor: Callable[[float], float], epochs: int, batch_size: int, seed: int = 0,
                      set_mode: Callable[[int], None] | None = None, grad_clip: float = 1.0,
                      checkpoint_dir: Path | None = None, resume: bool = False, fingerprint: dict | None = None,
                      progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train everything trainable in `modules` (the specialist and any auxiliary net, e.g. a domain
    discriminator); returns {"history", "train_s", "examples_per_s"}.

    `lr_factor(p)` scales every group's base learning rate at training progress p in [0, 1].
    """
    steps_per_epoch = max(1, math.ceil(n_source / batch_size))
    total = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step / total))
    labels = torch.tensor(source_labels)
    history: list[dict[str, float]] = []
    start = 0
    if resume and checkpoint_dir is not None and (ckpt := find_checkpoint(checkpoint_dir)):
        if set_mode is not None:
            set_mode(0)
        state = load_checkpoint(ckpt, model=modules, optimizer=optimizer, scheduler=scheduler)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise TrainingError(f"{ckpt} belongs to a different run (data, base or config changed); "
                                "delete it or drop --resume")
        history, start = state["history"], state["epoch"] + 1
        log(f"resumed from {ckpt} after epoch {start}/{epochs}")
    bar = tqdm(total=total, initial=start * steps_per_epoch, disable=not progress, file=sys.stderr, unit="step",
               dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    for epoch in range(start, epochs):
        if set_mode is not None:
            set_mode(epoch)
        src_order = _shuffle(n_source, seed * 100_003 + epoch)
        tgt_order = _shuffle(n_target, seed * 100_003 + epoch + 50_000)
        sums: dict[str, float] = {}
        epoch_t0 = time.perf_counter()
        for step in range(steps_per_epoch):
            s_idx = src_order[step * batch_size:(step + 1) * batch_size]
            t_idx = [tgt_order[(step * batch_size + j) % n_target] for j in range(len(s_idx))]
            progress_p = (epoch * steps_per_epoch + step) / total
            fs, ft = featurize(s_idx, t_idx)
            loss, stats = step_loss(fs, labels[s_idx], ft, progress_p)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            optimizer.step()
            scheduler.step()
            seen += len(s_idx)
            stats = {"loss": loss.item(), **stats}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", **{k: f"{v:.3f}" for k, v in stats.items()}, refresh=False)
            bar.update(1)
        row = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
               "epoch_s": time.perf_counter() - epoch_t0}
        history.append(row)
        if checkpoint_dir is not None:
            save_checkpoint(Path(checkpoint_dir), weights=trainable_state(modules), optimizer=optimizer,
                            scheduler=scheduler, state={"epoch": epoch, "history": history, "fingerprint": fingerprint})
    bar.close()
    train_s = time.perf_counter() - t0
    return {"history": history, "train_s": train_s, "examples_per_s": seen / train_s if train_s > 0 else 0.0}


def _shuffle(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def warmup_cosine_factor(warmup: float = 0.1) -> Callable[[float], float]:
    """Linear warm-up over the first `warmup` share of training, then cosine decay to 0."""
    def factor(p: float) -> float:
        if p < warmup:
            return (p + 1e-3) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (p - warmup) / max(1e-9, 1 - warmup))))
    return factor
