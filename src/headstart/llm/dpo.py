"""Preference tuning (`--task dpo`): Direct Preference Optimisation from an SFT bundle (or a base).

    spec = headstart.fit("prefs.jsonl", base="runs/alpaca-lora", task="dpo", out="runs/alpaca-dpo")

The policy is the SFT model's adapter, trained further; the reference is the same model frozen as it
was loaded. Its log-probabilities of every chosen and rejected answer are computed once before
training (the reference never changes), so each step runs only the policy. Started from a plain
base, the policy is a fresh LoRA adapter and the reference the base itself.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.perf import peak_memory_mb
from ..core.errors import DataError
from .config import DPOConfig
from .data import load_preference_examples
from .dpo_maths import dpo_loss, sequence_logps
from .sft import _bf16, _checkpoint_dir, _config, _drop_checkpoints, _file_key, prepare_model, train_and_held
from ..bundle.generator import LMSpecialist
from .tokenize import IGNORE, encode_preference, pad_batch
from .train import autocast, epoch_batches, train_adapter


def fit_dpo(data: str | Path, base: str = "smollm2-135m", method: str | None = None, *, eval: str | Path | None = None,
            out: str | Path | None = None, seed: int = 0, resume: bool = False, progress: bool = True,
            log: Callable[[str], None] = print, **options: Any) -> LMSpecialist:
    """DPO on JSONL rows with `prompt`, `chosen`, `rejected`; `base` is an SFT bundle folder or a base name."""
    t0 = time.perf_counter()
    cfg = _config(DPOConfig, options, seed)
    train, held, skipped = train_and_held(load_preference_examples, data, eval, cfg.eval_fraction, seed)
    model, tokenizer, base_json, method, parent, bf16 = _policy(base, method, cfg, log)
    train_rows, held_rows = _encode(tokenizer, train, cfg.max_length), _encode(tokenizer, held, cfg.max_length)
    if not train_rows:
        raise DataError(f"{data}: no preference pair keeps both answers within max_length={cfg.max_length}")
    pad_id = tokenizer.pad_token_id
    log(f"dpo: {len(train_rows)} training pairs, {len(held_rows)} held out ({len(skipped)} rows skipped); "
        "scoring the reference once")
    ref_train = _logps(model, train_rows, pad_id, cfg.batch_size, bf16)
    ref_held = _logps(model, held_rows, pad_id, cfg.batch_size, bf16)
    before = _preference_eval(model, held_rows, ref_held, pad_id, cfg, bf16)

    def step_loss(idx: list[int]):
        batch = pad_batch([train_rows[i]["chosen"] for i in idx] + [train_rows[i]["rejected"] for i in idx], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits.float(), batch["labels"])
        chosen, rejected = logps[:len(idx)], logps[len(idx):]
        at = torch.tensor(idx)
        loss, stats = dpo_loss(chosen, rejected, ref_train[0][at], ref_train[1][at], cfg.beta)
        return loss, stats, int(batch["attention_mask"].sum())

    order = lambda e: [list(b) for b in torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(  # noqa: E731
        seed * 1000 + e)).split(cfg.batch_size)]
    fingerprint = {"task": "dpo", "base": base_json["sha256"], "parent": parent, "method": method,
                   "config": cfg.to_json(), "seed": seed, "data": _file_key(data), "eval": _file_key(eval)}
    ckpt = _checkpoint_dir(out, fingerprint)
    run = train_adapter(model, batches=epoch_batches(order, cfg.epochs), step_loss=step_loss, lr=cfg.lr,
                        weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, bf16=bf16,
                        checkpoint_every=cfg.checkpoint_every, checkpoint_dir=ckpt, resume=resume,
                        fingerprint=fingerprint, progress=progress, log=log)
    after = _preference_eval(model, held_rows, ref_held, pad_id, cfg, bf16)
    log(f"held-out reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
        f"DPO loss {before['dpo_loss']:.4f} -> {after['dpo_loss']:.4f}")
    metrics = {"reward_accuracy_before": before["reward_accuracy"], "reward_accuracy": after["reward_accuracy"],
               "eval_dpo_loss_before": before["dpo_loss"], "eval_dpo_loss": after["dpo_loss"],
               "reward_margin": after["margin"], "train_examples": len(train_rows), "eval_examples": len(held_rows),
               "tokens": run["tokens"], "tokens_per_s": round(run["tokens_per_s"], 1), "train_s": round(run["train_s"], 1),
               "skipped": len(skipped), "bf16": bf16, "wall_s": round(time.perf_counter() - t0, 1),
               "peak_mem_mb": round(peak_memory_mb(), 1)}
    manifest = {"task": "dpo", "base": base_json, "method": {"name": method, "config": cfg.to_json()}, "seed": seed,
                "parent": parent, "history": run["history"], "metrics": metrics,
                "data": {"source": str(data), "eval": str(eval) if eval else f"{cfg.eval_fraction:.0%} of the pairs",
                         "skipped": [list(s) for s in skipped][:100]}}
    spec = LMSpecialist(model, tokenizer, manifest, bf16)
    if out is not None:
        manifest["bundle_name"] = str(out)
        spec.save(out)
    _drop_checkpoints(ckpt)
    return spec


def _policy(base: str, method: str | None, cfg: DPOConfig, log):
    """(trainable PEFT model, tokenizer, base manifest entry, method, parent bundle or None, bf16)."""
    from .model import cpu_supports_bf16

    if (Path(base) / "manifest.json").is_file():  # an SFT bundle: continue its adapter
        sft = LMSpecialist.load(base, trainable=True)
        log(f"dpo from the {sft.manifest['task']} bundle {base} ({sft.method} on {sft.manifest['base']['name']})")
        parent = {"bundle": str(base), "task": sft.manifest["task"], "created": sft.manifest.get("created")}
        return (sft.model, sft.tokenizer, sft.manifest["base"], sft.method, parent,
                _bf16(cfg.bf16, cpu_supports_bf16()))
    model, tokenizer, info, bf16 = prepare_model(base, method or "lora", cfg, log)
    return model, tokenizer, info.to_json(), method or "lora", None, bf16


def _encode(tokenizer, pairs, max_length: int) -> list[dict]:
    rows = [encode_preference(tokenizer, ex, max_length) for ex in pairs]
    return [r for r in rows if all(any(t != IGNORE for t in r[k]["labels"]) for k in ("chosen", "rejected"))]


@torch.no_grad()
def _logps(model, rows: list[dict], pad_id: int, batch_size: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected answers, [N] each, in eval mode."""
    was_training = model.training
    model.eval()
    out = {"chosen": [], "rejected": []}
    for key in out:
        for start in range(0, len(rows), batch_size):
            batch = pad_batch([r[key] for r in rows[start:start + batch_size]], pad_id)
            with autocast(bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out[key].append(sequence_logps(logits.float(), batch["labels"]))
    model.train(was_training)
    empty = torch.zeros(0)
    return (torch.cat(out["chosen"]) if out["chosen"] else empty, torch.cat(out["rejected"]) if out["rejected"] else empty)


def _preference_eval(model, rows, ref, pad_id: int, cfg: DPOConfig, bf16: bool) -> dict[str, float]:
    if not rows:
        return {"reward_accuracy": float("nan"), "dpo_loss": float("nan"), "margin": float("nan")}
    chosen, rejected = _logps(model, rows, pad_id, cfg.batch_size, bf16)
    loss, stats = dpo_loss(chosen, rejected, ref[0], ref[1], cfg.beta)
    return {"reward_accuracy": stats["reward_accuracy"], "dpo_loss": loss.item(), "margin": stats["margin"]}
