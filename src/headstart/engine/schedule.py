"""Learning-rate plumbing: layer-wise decay over a backbone's blocks, warm-up then cosine."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def layerwise_param_groups(blocks: list[tuple[str, nn.Module]], head: nn.Module, lr: float, head_lr: float,
                           layer_decay: float, weight_decay: float) -> list[dict]:
    """One optimizer group per block; block i from the top gets lr * layer_decay**i.

    Lower layers hold generic features that transfer as they are, so they move least
    (ULMFiT's discriminative fine-tuning; BEiT/ELECTRA's layer-wise decay). Biases and norm
    weights get no weight decay, as in BERT. Frozen parameters are included so that gradual
    unfreezing only has to flip `requires_grad`.
    """
    groups: list[dict] = []
    n = len(blocks)
    for depth, (name, block) in enumerate(blocks):
        scale = layer_decay ** (n - 1 - depth)
        groups += _split_decay(block, lr * scale, weight_decay, name)
    groups += _split_decay(head, head_lr, weight_decay, "head")
    return [g for g in groups if g["params"]]


def _split_decay(module: nn.Module, lr: float, weight_decay: float, name: str) -> list[dict]:
    decay, no_decay = [], []
    for pname, p in module.named_parameters():
        (no_decay if p.ndim <= 1 or pname.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": name + ".no_decay"},
    ]


LrSchedule = Callable[[int, int], float]
"""(step, total steps) -> the factor every group's base learning rate is multiplied by."""


def warmup_cosine_schedule(warmup_ratio: float) -> LrSchedule:
    """Linear warm-up over the first `warmup_ratio` of the steps, then cosine decay to 0."""
    def factor(step: int, total: int) -> float:
        total = max(1, total)
        warmup = min(max(0, math.ceil(warmup_ratio * total)), total - 1)
        return _warmup_cosine(step, total, warmup)
    return factor


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to each group's lr, then cosine decay to 0."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, total_steps, warmup_steps))


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
