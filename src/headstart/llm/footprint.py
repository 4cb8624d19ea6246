"""The memory plan of adapter training (sft, dpo): measured on the run's own longest example, before step one.

What one example costs is measured, not guessed: one forward with gradients on the longest example (or
preference pair) of the training set, counting the bytes autograd saves for the backward (the
activations; parameters excluded). With per-layer activation checkpointing only each decoder layer's
input stays saved, plus one layer's full activations while it is recomputed in the backward. Weights, the
adapter's gradients and AdamW state, the LM head's loss chunks and the Python/torch runtime are the fixed
part, taken from the process's resident memory once the model is loaded. engine/memory.plan_micro_batch
then picks checkpointing and the largest micro-batch that fits the budget (the rest of the batch is
accumulated), or stops the run up front with the numbers.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..engine.memory import Budget, MemoryPlan, plan_micro_batch, resolve_budget, rss_bytes, saved_activation_bytes
from .lm_head import CHUNK_ROWS

ALLOCATOR_SLACK = 1.3
"""Measured peak over counted bytes (glibc keeps freed blocks; a backward holds a layer's gradients
beside its activations): smollm2-135m, batch 8 x 512 on this 2-core machine."""


def plan_adapter_memory(model, one_example: Callable[[], torch.Tensor], *, tokens: int, batch_size: int,
                        checkpointing: str, micro_batch: int, budget: Budget | None,
                        log: Callable[[str], None]) -> MemoryPlan:
    """Choose micro-batch and activation checkpointing for training `model`'s adapter within `budget`.

    `one_example()` runs the loss of the costliest example (autocast as in training); `tokens` is its
    padded length in all (both answers of a pair). `checkpointing`: auto / true / false. A `micro_batch`
    > 0 is the user's choice and is only checked against the budget. Enables checkpointing on `model` when the plan says so.
    """
    budget = budget or resolve_budget(None)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config
    full = saved_activation_bytes(model, one_example)
    layers, width = config.num_hidden_layers, config.hidden_size
    # checkpointed: every layer's input (fp32 residual stream) + one layer recomputed with its gradients
    checkpointed = layers * tokens * width * 4 + 2 * full // layers
    costs = {"on": int(checkpointed * ALLOCATOR_SLACK), "off": int(full * ALLOCATOR_SLACK)}
    modes = {"true": ["on"], "false": ["off"]}.get(checkpointing, ["on", "off"])
    if checkpointing == "auto" and torch.cuda.is_available():
        modes = ["off", "on"]  # a GPU recomputes at a real cost; on a CPU the smaller working set ran faster
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    vocab = config.vocab_size
    fixed = rss_bytes() + 3 * trainable + 4 * CHUNK_ROWS * vocab * 4  # grads + AdamW moments; head chunks
    plan = plan_micro_batch(budget, fixed=fixed, per_example={mode: costs[mode] for mode in modes},
                            batch_size=batch_size, sizes=[min(micro_batch, batch_size)] if micro_batch else None)
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
