"""The one training loop, on Hugging Face Accelerate.

`accelerate launch --num_processes 2 ...` runs it data-parallel unchanged: Accelerate shards
the batches, all-reduces the gradients and gathers the validation predictions, and only the
main process writes checkpoints. On one CPU process it is a plain, seeded PyTorch loop.

Per epoch: train (warm-up then cosine LR, gradient clipping), evaluate on the selection
split, keep the best weights (early stopping with patience), write a checkpoint. `resume`
continues after the last completed epoch of an interrupted run (Ctrl-C or kill -9).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..data import Split
from ..core.errors import TrainingError
from .checkpoint import copy_state_into, find_checkpoint, load_checkpoint, save_checkpoint
from .schedule import warmup_cosine


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


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch): identical on every process and on resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _Examples(torch.utils.data.Dataset):
    def __init__(self, split: Split, load: Callable[[Any], Any]):
        self.split, self.load = split, load

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.load(self.split.items[i]), self.split.labels[i]


def make_loader(split: Split, load: Callable, collate: Callable, batch_size: int, train: bool,
                sampler: Sampler | None = None) -> DataLoader:
    def collate_fn(rows):
        items, labels = zip(*rows)
        return collate(list(items), train), torch.tensor(labels)

    return DataLoader(_Examples(split, load), batch_size=batch_size, sampler=sampler, shuffle=False,
                      collate_fn=collate_fn, num_workers=0)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, plus all buffers (BN statistics) of the modules that own them.

    Buffers are included whatever the module's current mode: a BN layer trained in train mode
    and saved in eval mode still carries statistics that differ from the base's.
    """
    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if any(p.requires_grad for _, p in own):
            prefix = mname + "." if mname else ""
            for n, p in own:
                if p.requires_grad:
                    out[prefix + n] = p
            for n, b in module.named_buffers(recurse=False):
                if n not in module._non_persistent_buffers_set:  # e.g. CLIP's position_ids: not state
                    out[prefix + n] = b
    return out


def train_loop(model: nn.Module, *, train: Split, val: Split | None, load: Callable, collate: Callable,
               param_groups: list[dict], cfg: LoopConfig, set_mode: Callable[[nn.Module, int], None],
               checkpoint_dir: Path | None = None, resume: bool = False, fingerprint: dict | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `model` (logits = model(**batch)) and return the history and best epoch.

    `set_mode(model, epoch)` puts the model in train mode for an epoch: methods use it to keep
    frozen BatchNorms in eval mode and to unfreeze blocks gradually.
    """
    from accelerate import Accelerator  # imported here: `headstart predict` never needs it

    torch.manual_seed(cfg.seed)
    accelerator = Accelerator()
    sampler = EpochShuffle(len(train), cfg.seed)
    train_loader = make_loader(train, load, collate, cfg.batch_size, True, sampler)
    val_loader = make_loader(val, load, collate, cfg.eval_batch_size, False) if val is not None and len(val) else None
    optimizer = torch.optim.AdamW(param_groups)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * cfg.epochs
    # Stepped by hand once per optimizer step (Accelerate's wrapper would step it once per process).
    scheduler = warmup_cosine(optimizer, total, math.ceil(cfg.warmup_ratio * total))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    unwrapped = accelerator.unwrap_model(model)

    history: list[dict[str, float]] = []
    best = {"epoch": -1, "val_accuracy": -1.0, "val_loss": float("inf"), "state": None}
    start_epoch = 0
    if resume and checkpoint_dir is not None and (ckpt := find_checkpoint(checkpoint_dir)):
        # Set the epoch's train mode first so gradual unfreezing restores the same trainable set.
        saved_epoch = _peek_epoch(ckpt)
        set_mode(unwrapped, saved_epoch)
        state = load_checkpoint(ckpt, model=unwrapped, optimizer=optimizer, scheduler=scheduler)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise TrainingError(f"{ckpt} belongs to a different run (data, base or config changed); "
                                "delete it or drop --resume")
        history, start_epoch = state["history"], state["epoch"] + 1
        best.update(epoch=state["best_epoch"], val_accuracy=state["best_val_accuracy"],
                    val_loss=state.get("best_val_loss", float("inf")))
        if (ckpt / "best.safetensors").exists():
            from safetensors.torch import load_file
            best["state"] = load_file(ckpt / "best.safetensors")
        log(f"resumed from {ckpt} after epoch {start_epoch}/{cfg.epochs}")

    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, disable=not progress or not accelerator.is_main_process,
               file=sys.stderr, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    seen = 0
    epochs_without_gain = 0
    for epoch in range(start_epoch, cfg.epochs):
        # Through the prepared loader: Accelerate re-sets its sampler's epoch from the loader's own counter.
        train_loader.set_epoch(epoch)
        set_mode(unwrapped, epoch)
        running, batches, epoch_t0 = 0.0, 0, time.perf_counter()
        for batch, labels in train_loader:
            logits = model(**batch)
            loss = loss_fn(logits.float(), labels)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_([p for g in param_groups for p in g["params"] if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            batches += 1
            seen += labels.shape[0] * accelerator.num_processes
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{running / batches:.4f}", refresh=False)
            bar.update(1)
        row = {"epoch": epoch + 1, "train_loss": running / max(1, batches), "epoch_s": time.perf_counter() - epoch_t0}
        if val_loader is not None:
            row.update(_evaluate(model, val_loader, accelerator, loss_fn))
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{row['train_loss']:.4f}",
                            val_acc=f"{row['val_accuracy']:.4f}")
            # Small validation sets tie on accuracy often: the lower loss breaks the tie.
            improved = (row["val_accuracy"], -row["val_loss"]) > (best["val_accuracy"], -best["val_loss"])
        else:
            improved = True  # nothing to select on: the last epoch is the one kept
        history.append(row)
        if improved:
            best.update(epoch=epoch + 1, val_accuracy=row.get("val_accuracy", -1.0), val_loss=row.get("val_loss", 0.0),
                        state={k: v.detach().clone() for k, v in trainable_state(unwrapped).items()})
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
        if checkpoint_dir is not None and accelerator.is_main_process:
            _save(checkpoint_dir, unwrapped, optimizer, scheduler, epoch, history, best, fingerprint)
        accelerator.wait_for_everyone()
        if cfg.patience and epochs_without_gain >= cfg.patience and epoch + 1 < cfg.epochs:
            log(f"early stop after epoch {epoch + 1}: no better validation accuracy for {cfg.patience} epochs")
            break
    bar.close()
    if best["state"] is not None:
        copy_state_into(unwrapped, best["state"], what="best-epoch weights")
    train_s = time.perf_counter() - t0
    return {"history": history, "best_epoch": best["epoch"], "train_s": train_s,
            "examples_per_s": seen / train_s if train_s > 0 else 0.0, "num_processes": accelerator.num_processes,
            "is_main_process": accelerator.is_main_process, "model": unwrapped}


@torch.no_grad()
def _evaluate(model, loader, accelerator, loss_fn) -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch, labels in loader:
        logits = model(**batch)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        loss_sum += loss_fn(logits.float(), labels).item() * labels.shape[0]
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.shape[0]
    model.train(was_training)
    return {"val_accuracy": correct / max(1, total), "val_loss": loss_sum / max(1, total)}


def _save(folder, model, optimizer, scheduler, epoch, history, best, fingerprint) -> None:
    state = {"epoch": epoch, "history": history, "best_epoch": best["epoch"],
             "best_val_accuracy": best["val_accuracy"], "best_val_loss": best["val_loss"], "fingerprint": fingerprint}
    extra = {"best": best["state"]} if best["state"] is not None else None
    save_checkpoint(Path(folder), weights=trainable_state(model), optimizer=optimizer, scheduler=scheduler,
                    state=state, extra=extra)


def _peek_epoch(folder: Path) -> int:
    import json

    return json.loads((Path(folder) / "state.json").read_text())["epoch"]

