"""Finetune's memory plan: examples per forward (gradient accumulation) and the allocator, chosen before training
from the run's budget and the measured cost of one example.

Training holds, per example, every activation autograd saves for the backward pass: 125 MB an image for
efficientnet-lite0 at 288 px (all blocks open), so the default batch of 16 in one forward took 2 GB of
activations on top of the runtime (0.9 GB: torch, timm). Splitting it into micro-batches, one backward each,
gives the same gradient (the batch's mean loss is the size-weighted mean of the parts') for a fraction of the memory.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...engine.memory import (MB, Budget, MemoryPlan, human, plan_micro_batch, resolve_budget, rss_bytes,
                              saved_activation_bytes, training_state_bytes)

TRAIN_ACTIVATIONS = 1536 * MB
"""Saved-activation bytes one forward may hold however large the budget: 8 images of efficientnet-lite0 at
288 px. A training step of 16 images in one forward peaked at 3.8 GB (glibc tuning on), in two forwards of 8
at 2.4 GB (bare loop, 2 cores); the gradient is the same."""
BACKWARD_SLACK = 1.5
"""Peak resident bytes per saved activation byte during backward (the gradients of activations are
allocated while the saved tensors are freed), measured on efficientnet-lite0."""


def train_example_bytes(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves for one example's forward in the model's current mode (frozen blocks and
    BatchNorms as they are), times BACKWARD_SLACK."""
    return int(BACKWARD_SLACK * saved_activation_bytes(model, lambda: model(**example), train=False))


def plan_training(model: torch.nn.Module, example: dict[str, torch.Tensor], batch_size: int,
                  budget: Budget | None, log: Callable[[str], None] = print) -> MemoryPlan:
    """The micro-batch for `batch_size`-example steps: the largest divisor of the batch that fits the budget,
    no larger than TRAIN_ACTIVATIONS allows. Raises MemoryBudgetError up front when one
    example does not fit: the weights, their gradients and AdamW's two moments plus one example's activations."""
    budget = budget or resolve_budget(None)
    per_example = train_example_bytes(model, example)
    fixed = rss_bytes() + training_state_bytes(model)
    plan = plan_micro_batch(budget, fixed=fixed, per_example={"off": per_example}, batch_size=batch_size,
                            what=f"finetune ({human(per_example)} of activations an example)")
    fast = max(1, TRAIN_ACTIVATIONS // per_example)
    micro = max(d for d in range(1, plan.micro_batch + 1) if batch_size % d == 0 and (d <= fast or d == 1))
    plan = MemoryPlan(micro, batch_size // micro, plan.checkpointing, fixed + micro * per_example, budget)
    log(f"finetune {plan.describe()}")
    return plan
