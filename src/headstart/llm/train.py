"""Adapter training for `sft` and `dpo` on the one engine, and the answer losses they train and measure.

The batches of every epoch are laid out from the seed (engine/batches.py), so a run is deterministic and
`resume` skips exactly the steps already done. Every `checkpoint_every` steps the adapter, optimizer,
scheduler and RNG go to a checkpoint (engine.checkpoint); Ctrl-C or kill -9 loses at most that many steps.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..engine.batches import BatchPlan
from ..engine.checkpoint import Checkpointer
from ..engine.schedule import warmup_cosine_schedule
from ..engine.trainer import StepLoss, TrainResult, TrainSettings, autocast, train
from .lm_head import target_logps
from .tokenize import IGNORE, pad_batch

__all__ = ["answer_logps", "answer_loss", "summed_answer_logps", "autocast", "response_loss", "train_adapter"]


def train_adapter(model: torch.nn.Module, *, plan: BatchPlan, step_loss: StepLoss, lr: float, weight_decay: float,
                  warmup_ratio: float, bf16: bool, checkpoint_every: int, checkpoint: Checkpointer,
                  progress: bool = True, log: Callable[[str], None] = print, log_every: int = 10,
                  micro_batch: int = 0, loss_weight: Callable[[list[int]], float] | None = None) -> TrainResult:
    """Train every parameter with requires_grad (the adapter) on `plan`; a history row every `log_every` steps.
    `micro_batch` > 0 accumulates each batch in parts of that many examples (engine.TrainSettings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return train(model, plan=plan, step_loss=step_loss,
                 param_groups=[{"params": params, "lr": lr, "weight_decay": weight_decay}],
                 settings=TrainSettings(lr_schedule=warmup_cosine_schedule(warmup_ratio), bf16=bf16,
                                        checkpoint_every=checkpoint_every, log_every=log_every,
                                        micro_batch=micro_batch, loss_weight=loss_weight),
                 set_mode=lambda epoch: model.train(), checkpoint=checkpoint, progress=progress, log=log)


def answer_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] float32 log-probabilities of the labelled (answer) tokens, [N] the row each comes from).

    The LM head runs only where there is a label, in chunks (llm/lm_head.py): the [B, T, vocab] logits
    (49k columns for SmolLM2) are never built, not even for the answer positions all at once.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT injects LoRA in place
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    rows = keep.nonzero()[:, 0]
    return target_logps(lm.lm_head, hidden[:, :-1][keep], targets[keep]), rows


def summed_answer_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] float32: each row's answer log-probability (its labelled tokens' log-probabilities summed)."""
    logps, rows = answer_logps(model, batch)
    return torch.zeros(batch["input_ids"].shape[0], dtype=torch.float32, device=logps.device).index_add(0, rows, logps)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens -- equal to `model(**batch).loss`."""
    logps, _ = answer_logps(model, batch)
    return -logps.mean()


@torch.no_grad()
def response_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8, bf16: bool = False) -> tuple[float, int]:
    """(mean cross-entropy per labelled token, number of labelled tokens) -- token-weighted over batches."""
    if not rows:
        return float("nan"), 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # little padding
    for start in range(0, len(order), batch_size):
        batch = pad_batch([rows[i] for i in order[start:start + batch_size]], pad_id)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
        with autocast(bf16):
            loss = answer_loss(model, batch)
        total += loss.float().item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1), count
