"""Preference tuning: Direct Preference Optimisation (Rafailov et al. 2023), usually from an SFT bundle.

    spec = headstart.fit("prefs.jsonl", task="dpo", init="runs/alpaca-lora", out="runs/alpaca-dpo")

The policy is the starting model's adapter, trained further; the reference is the same model frozen as
it was loaded. Its log-probabilities of every chosen and rejected answer are computed once before
training (the reference never changes), so each step runs only the policy. Started from a plain base,
the policy is a fresh LoRA adapter and the reference the base itself.
"""
from __future__ import annotations

import torch

from ...core.errors import DataError
from ..base import FitContext, FitResult
from ..sft.method import (AdapterMethod, LMStart, TuningData, adapter_training, memory_plan, trainable_adapter,
                          training_result)
from .config import DPOConfig
from .maths import dpo_loss


class DPO(AdapterMethod):
    """DPO on the float32 causal LM: the adapter moves towards the chosen answers, away from the rejected."""

    config: DPOConfig

    def fit(self, start: LMStart, data: TuningData, ctx: FitContext) -> FitResult:
        from ...engine.batches import EpochShuffle
        from ...llm.tokenize import pad_batch
        from ...llm.train import summed_answer_logps

        cfg = self.config
        model, bf16 = trainable_adapter(start, cfg, self.name, ctx.log)
        train_rows = encode_pairs(start.tokenizer, data.train, cfg.max_length)
        held_rows = encode_pairs(start.tokenizer, data.held, cfg.max_length)
        if not train_rows:
            raise DataError(f"{data.source}: no preference pair keeps both answers within max_length={cfg.max_length}")
        pad_id = start.tokenizer.pad_token_id
        ctx.log(f"dpo: {len(train_rows)} training pairs, {len(held_rows)} held out ({len(data.skipped)} rows "
                "skipped); scoring the reference once")
        ref_train = answer_logps(model, train_rows, pad_id, cfg.batch_size, bf16)  # ([N] chosen, [N] rejected)
        ref_held = answer_logps(model, held_rows, pad_id, cfg.batch_size, bf16)
        before = preference_eval(model, held_rows, ref_held, pad_id, cfg, bf16)

        def step_loss(idx: list[int], progress: float):
            batch = pad_batch([train_rows[i]["chosen"] for i in idx] + [train_rows[i]["rejected"] for i in idx], pad_id)
            logps = summed_answer_logps(model, batch)  # [2B]: chosen rows, then rejected rows
            at = torch.tensor(idx)
            loss, stats = dpo_loss(logps[:len(idx)], logps[len(idx):], ref_train[0][at], ref_train[1][at], cfg.beta)
            return loss, stats, int(batch["attention_mask"].sum())

        costliest = max(range(len(train_rows)), key=lambda i: pair_tokens(train_rows[i]))
        memory = memory_plan(model, lambda: step_loss([costliest], 0.0)[0], pair_tokens(train_rows[costliest]), cfg,
                             bf16, ctx, sequences_per_example=2)  # a pair: chosen + rejected
        plan = EpochShuffle(len(train_rows), cfg.batch_size, cfg.epochs, ctx.seed)
        run = adapter_training(model, plan, step_loss, cfg, bf16, ctx, memory)
        after = preference_eval(model, held_rows, ref_held, pad_id, cfg, bf16)
        ctx.log(f"held-out reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
                f"DPO loss {before['dpo_loss']:.4f} -> {after['dpo_loss']:.4f}")
        # Measured here: the held-out reference scores exist only in this run (the reference is not kept).
        held_out = {"reward_accuracy_before": before["reward_accuracy"], "reward_accuracy": after["reward_accuracy"],
                    "eval_dpo_loss_before": before["dpo_loss"], "eval_dpo_loss": after["dpo_loss"],
                    "reward_margin": after["margin"], "train_examples": len(train_rows),
                    "eval_examples": len(held_rows)}
        return training_result(model, run, held_out, bf16, cfg)


class QloraDPO(DPO):
    """DPO with a LoRA adapter on the causal LM quantised to 4-bit NF4."""

    quantize = "nf4"


def encode_pairs(tokenizer, pairs, max_length: int) -> list[dict]:
    """Token rows {"chosen", "rejected"} of the pairs whose two answers both keep a token within max_length."""
    from ...llm.tokenize import IGNORE, encode_preference

    rows = [encode_preference(tokenizer, ex, max_length) for ex in pairs]
    return [r for r in rows if all(any(t != IGNORE for t in r[k]["labels"]) for k in ("chosen", "rejected"))]


def pair_tokens(row: dict) -> int:
    """Tokens one pair puts through the model in a step: both answers, padded to the longer."""
    return 2 * max(len(row["chosen"]["input_ids"]), len(row["rejected"]["input_ids"]))


@torch.no_grad()
def answer_logps(model, rows: list[dict], pad_id: int, batch_size: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected answers, [N] each, in eval mode."""
    from ...llm.tokenize import pad_batch
    from ...llm.train import autocast, summed_answer_logps

    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for key in out:
        for start in range(0, len(rows), batch_size):
            batch = pad_batch([r[key] for r in rows[start:start + batch_size]], pad_id)
            with autocast(bf16):
                out[key].append(summed_answer_logps(model, batch))
    model.train(was_training)
    empty = torch.zeros(0)
    return (torch.cat(out["chosen"]) if out["chosen"] else empty, torch.cat(out["rejected"]) if out["rejected"] else empty)


def preference_eval(model, rows, ref, pad_id: int, cfg: DPOConfig, bf16: bool) -> dict[str, float]:
    """Reward accuracy, DPO loss and reward margin of the policy against the reference scores `ref`."""
    if not rows:
        return {"reward_accuracy": float("nan"), "dpo_loss": float("nan"), "margin": float("nan")}
    chosen, rejected = answer_logps(model, rows, pad_id, cfg.batch_size, bf16)
    loss, stats = dpo_loss(chosen, rejected, ref[0], ref[1], cfg.beta)
    return {"reward_accuracy": stats["reward_accuracy"], "dpo_loss": loss.item(), "margin": stats["margin"]}
