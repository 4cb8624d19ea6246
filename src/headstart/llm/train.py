"""The adapter training loop shared by `sft` and `dpo`: steps over precomputed batches, resumable.

Batches (lists of example indices, all epochs laid out up front from the seed) make the run
deterministic and let `resume` skip exactly the steps already done. Every `checkpoint_every` steps
the trainable weights (the adapter), optimizer, scheduler and RNG go to a safetensors + JSON
checkpoint (engine.checkpoint); Ctrl-C or kill -9 loses at most that many steps.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..engine.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ..engine.schedule import warmup_cosine
from ..core.errors import TrainingError

StepLoss = Callable[[list[int]], tuple[torch.Tensor, dict[str, float], int]]
"""batch indices -> (loss, stats for the log, tokens processed)."""


def autocast(enabled: bool):
    """bfloat16 autocast on the CPU (or the GPU the model is on) when enabled; a no-op otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)


def train_adapter(model: torch.nn.Module, *, batches: list[list[int]], step_loss: StepLoss, lr: float,
                  weight_decay: float, warmup_ratio: float, bf16: bool, checkpoint_every: int,
                  checkpoint_dir: Path | None = None, resume: bool = False, fingerprint: dict | None = None,
                  progress: bool = True, log: Callable[[str], None] = print, log_every: int = 10) -> dict:
    """Train every parameter with requires_grad; returns {history, train_s, tokens, tokens_per_s, steps}."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: the model has no trainable parameters")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = len(batches)
    scheduler = warmup_cosine(optimizer, total, math.ceil(warmup_ratio * total))
    history: list[dict[str, float]] = []
    start, tokens = 0, 0
    if resume and checkpoint_dir is not None and (ckpt := find_checkpoint(checkpoint_dir)):
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise TrainingError(f"{ckpt} belongs to a different run (data, base or config changed); "
                                "delete it or drop --resume")
        start, history, tokens = state["step"] + 1, state["history"], state["tokens"]
        log(f"resumed from {ckpt} after step {start}/{total}")
    model.train()
    bar = tqdm(total=total, initial=start, disable=not progress, file=sys.stderr, unit="step", dynamic_ncols=True)
    t0, run_tokens, window = time.perf_counter(), 0, []
    for step in range(start, total):
        with autocast(bf16):
            loss, stats, n_tokens = step_loss(batches[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run_tokens += n_tokens
        window.append(loss.item())
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{window[-1]:.4f}", tok_s=f"{run_tokens / max(elapsed, 1e-9):.0f}", refresh=False)
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == total:
            history.append({"step": step + 1, "loss": sum(window) / len(window),
                            "lr": scheduler.get_last_lr()[0], **stats})
            window = []
        if checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == total):
            save_checkpoint(Path(checkpoint_dir), weights=named, optimizer=optimizer, scheduler=scheduler,
                            state={"step": step, "history": history, "tokens": tokens + run_tokens,
                                   "fingerprint": fingerprint})
    bar.close()
    model.eval()
    train_s = time.perf_counter() - t0
    return {"history": history, "train_s": train_s, "tokens": tokens + run_tokens, "steps": total - start,
            "tokens_per_s": run_tokens / train_s if train_s > 0 else 0.0}


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
