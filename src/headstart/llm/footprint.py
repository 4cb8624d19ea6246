"""The memory plan of adapter training (sft, dpo): measured on the run's own longest example, before step one.

What one example costs is measured, not guessed: one forward with gradients on the longest example (or
preference pair) of the training set, counting the bytes autograd saves for the backward (the
activations; parameters excluded). With per-layer activation checkpointing only each decoder layer's
input stays saved, plus one layer's full activations while it is recomputed in the backward. Weights, the
adapter's gradients and AdamW state, the LM head's loss chunks and the Python/torch runtime are the fixed
part, taken from the process's resident memory once the model is loaded. The plan is the fastest of
CANDIDATES (checkpointing x what glibc does with freed blocks x micro-batch) whose measured peak fits the
budget, the rest of the batch accumulated; or the run stops up front with the numbers. On a CPU small
micro-batches train faster than whole batches (measured: 2 sequences per forward beat 8 by 1.5x), so the
fast candidates use 2 or 1, and only the last resort takes the largest micro-batch that fits.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..engine.memory import (Budget, MemoryBudgetError, MemoryPlan, plan_micro_batch, resolve_budget, rss_bytes,
                             saved_activation_bytes, training_state_bytes)
from ..engine.perf import release_freed_memory
from .lm_head import CHUNK_ROWS



@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to train: checkpointing on/off, whether glibc keeps freed blocks, the micro-batches it may
    use (largest first; None: any divisor of the batch) and its measured peak over the estimate."""

    checkpointing: str
    keep: bool
    micro_batches: tuple[int, ...] | None
    factor: float


CANDIDATES = (Candidate("off", True, (2, 1), 1.3), Candidate("on", True, (2, 1), 1.4),
              Candidate("off", False, (1,), 1.0), Candidate("on", False, None, 1.0))
"""Fastest first. smollm2-135m lora, the first 64 alpaca rows, batch 8, one process each on 2 cores
(2026-12-04), tokens/s at peak RSS:
- no checkpointing, glibc keeps: micro-batch 1 127 at 4.7 GB, 2 138 at 5.9 GB, 4 117 at 8.7 GB, 8 94 at
  13.6 GB: on a CPU a small micro-batch is faster (no padding, a working set that stays in cache);
- checkpointing, glibc keeps: micro-batch 1 73 at 4.6 GB, 2 87 at 4.5 GB, 4 84 at 6.0 GB, 8 73 at 8.1 GB;
- checkpointing, freed blocks returned: micro-batch 4 51 at 2.9 GB, 8 51 at 3.2 GB (page faults);
- no checkpointing, blocks returned, micro-batch 1: 69 at 3.8 GB (an earlier session).
The factor is the measured peak over the estimate (glibc's adaptive mmap threshold keeps what was freed):
1.3 for the first, from the whole alpaca epoch (6.89 GB against an estimate of 5.41 GB; 64 rows gave 1.1);
the last candidate has factor 1: a run that fits none fails with the budget's own numbers."""
ALLOCATOR_SLACK = 1.3
"""Peak over the saved bytes counted (a backward holds a layer's gradients beside its activations), with
freed blocks returned: the plan estimated 3.96 GB where smollm2-135m lora, batch 8, peaked at 3.2 GB."""


def plan_adapter_memory(model, one_example: Callable[[], torch.Tensor], *, tokens: int, batch_size: int,
                        checkpointing: str, micro_batch: int, budget: Budget | None,
                        log: Callable[[str], None], sequences_per_example: int = 1) -> MemoryPlan:
    """Choose checkpointing, allocator and micro-batch for training `model`'s adapter within `budget`: the
    fastest of CANDIDATES that fits (on a CPU: no checkpointing in micro-batches of 2 or 1 with glibc keeping
    freed blocks, then the same with checkpointing, then freed blocks returned to the OS, the smallest and
    slowest).

    `one_example()` runs the loss of the costliest example (autocast as in training); `tokens` is its
    padded length in all (both answers of a pair). `checkpointing`: auto / true / false. A `micro_batch`
    > 0 is the user's choice and is only checked against the budget. `sequences_per_example`: 2 for a
    preference pair, so the candidates' micro-batches (counted in sequences) hold as many sequences.
    Enables checkpointing on `model` and sets the allocator when the plan says so.
    """
    budget = budget or resolve_budget(None)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config
    full = saved_activation_bytes(model, one_example)
    layers, width = config.num_hidden_layers, config.hidden_size
    # checkpointed: every layer's input (fp32 residual stream) + one layer recomputed with its gradients
    checkpointed = layers * tokens * width * 4 + 2 * full // layers
    costs = {"on": int(checkpointed * ALLOCATOR_SLACK), "off": int(full * ALLOCATOR_SLACK)}
    fixed = rss_bytes() + training_state_bytes(model) + 4 * CHUNK_ROWS * config.vocab_size * 4  # + head chunks
    allowed = {"true": ("on",), "false": ("off",)}.get(checkpointing, ("on", "off"))
    plan, error = None, None
    for candidate in CANDIDATES:
        if candidate.checkpointing not in allowed:
            continue
        if micro_batch:
            sizes = [min(micro_batch, batch_size)]
        elif candidate.micro_batches:
            per_forward = {max(1, m // sequences_per_example) for m in candidate.micro_batches}
            sizes = sorted((m for m in per_forward if batch_size % m == 0), reverse=True)
        else:
            sizes = None
        try:
            plan = plan_micro_batch(Budget(int(budget.bytes / candidate.factor), budget.source), fixed=fixed,
                                    per_example={candidate.checkpointing: costs[candidate.checkpointing]},
                                    batch_size=batch_size, sizes=sizes)
        except MemoryBudgetError as e:
            error = e
            continue
        plan = dataclasses.replace(plan, estimate=int(plan.estimate * candidate.factor), budget=budget)
        break
    if plan is None:
        raise error
    if candidate.keep:
        log("allocator: glibc keeps freed blocks (faster; the budget has room)")
    else:
        release_freed_memory()
        log("allocator: freed blocks of 64 KB or more go back to the OS (smaller; slower on this CPU)")
    if plan.checkpointing == "on":
        enable_checkpointing(lm)
    log(f"{plan.describe()} (one example of {tokens} tokens: {costs['off'] / 2**20:.0f} MB of activations, "
        f"{costs['on'] / 2**20:.0f} MB checkpointed)")
    return plan


def enable_checkpointing(lm: torch.nn.Module) -> None:
    """Per-decoder-layer activation checkpointing (non-reentrant: frozen inputs need no requires_grad trick)."""
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 (the older name warns there)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
