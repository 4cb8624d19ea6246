"""Adapter training for `sft` and `dpo` on the one engine: steps over batches laid out up front, resumable.

Batches (lists of example indices, all epochs laid out up front from the seed) make the run
deterministic and let `resume` skip exactly the steps already done. Every `checkpoint_every` steps
the trainable weights (the adapter), optimizer, scheduler and RNG go to a checkpoint
(engine.checkpoint); Ctrl-C or kill -9 loses at most that many steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..engine.batches import PerEpoch
from ..engine.checkpoint import Checkpointer
from ..engine.schedule import warmup_cosine_schedule
from ..engine.trainer import TrainSettings, autocast, train  # noqa: F401  (autocast: used by sft/dpo evaluation)

StepLoss = Callable[[list[int]], tuple[torch.Tensor, dict[str, float], int]]
"""batch indices -> (loss, stats for the log, tokens processed)."""


def train_adapter(model: torch.nn.Module, *, batches: list[list[int]], step_loss: StepLoss, lr: float,
                  weight_decay: float, warmup_ratio: float, bf16: bool, checkpoint_every: int,
                  checkpoint_dir: Path | None = None, resume: bool = False, fingerprint: dict | None = None,
                  progress: bool = True, log: Callable[[str], None] = print, log_every: int = 10) -> dict:
    """Train every parameter with requires_grad; returns {history, train_s, tokens, tokens_per_s, steps, training}."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = train(model, plan=PerEpoch(lambda epoch: batches, epochs=1), step_loss=lambda batch, p: step_loss(batch),
                param_groups=[{"params": params, "lr": lr, "weight_decay": weight_decay}],
                settings=TrainSettings(lr_schedule=warmup_cosine_schedule(warmup_ratio), bf16=bf16,
                                       checkpoint_every=checkpoint_every, log_every=log_every),
                set_mode=lambda epoch: model.train(),
                checkpoint=Checkpointer(checkpoint_dir, fingerprint=fingerprint, resume=resume),
                progress=progress, log=log)
    return {"history": out.history, "train_s": out.train_s, "tokens": out.total_count, "steps": out.steps,
            "tokens_per_s": out.per_s, "training": out.training_facts()}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens -- equal to `model(**batch).loss`,
    but the LM head runs only where there is a label: the [B, T, vocab] logits of every prompt and
    padding position (49k columns for SmolLM2) are never built, which saves time and much memory."""
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT injects LoRA in place
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = lm.lm_head(hidden[:, :-1][keep])  # [N_labelled, vocab]
    return F.cross_entropy(logits.float(), targets[keep])


def epoch_batches(order: Callable[[int], list[list[int]]], epochs: int) -> list[list[int]]:
    """All epochs' batches laid out up front: `order(epoch)` gives one epoch's batches."""
    return [b for e in range(epochs) for b in order(e)]
