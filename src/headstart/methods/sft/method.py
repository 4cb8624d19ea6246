"""Instruction tuning of a causal LM: LoRA on the fp32 base (`lora`) or on a 4-bit NF4 base (`qlora`).

Each example is rendered with the base's chat template; the loss covers the assistant's answers (and
their end-of-turn token) only. The held-out loss is measured before and after training, on the same
rows, so the two are comparable. Started from a bundle (`fit(..., init=BUNDLE)`), the bundle's adapter
is trained further instead of a fresh one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ...core.errors import DataError
from ...engine.memory import MemoryPlan
from ..base import FitContext, FitResult, Method
from .config import SFTConfig


@dataclass
class LMStart:
    """What a generative method starts from (the task builds it; the method never loads a base)."""

    model: Any
    """The causal LM: plain (fp32, or 4-bit for qlora), or a PeftModel whose adapter a parent bundle trained."""
    tokenizer: Any
    base: dict[str, Any]
    """The base's manifest entry (name, sha256, ...)."""

    @property
    def continues_adapter(self) -> bool:
        return hasattr(self.model, "peft_config")


@dataclass
class TuningData:
    """Training and held-out examples of a generative task (chat examples or preference pairs)."""

    source: str
    train: list
    held: list
    skipped: list = field(default_factory=list)
    held_from: str = ""
    """Where the held-out examples come from (an eval file, or a share of the training file)."""


def trainable_adapter(start: LMStart, cfg: SFTConfig, method: str, log: Callable[[str], None]) -> tuple[Any, bool]:
    """(PEFT model whose adapter trains, bf16 flag): a fresh LoRA adapter on the base, or the parent's."""
    from ...llm.model import add_lora, bf16_enabled

    bf16 = bf16_enabled(cfg.bf16, strict=True)
    model = start.model
    if not start.continues_adapter:
        model = add_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.targets())
        model.peft_config["default"].base_model_name_or_path = start.base["name"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = "the parent bundle's adapter" if start.continues_adapter else "a fresh adapter"
    log(f"{method} on {start.base['name']}: {trainable:,} trainable parameters in {what}, "
        f"bf16 autocast {'on' if bf16 else 'off'}")
    return model, bf16


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if loss == loss else float("nan")


class AdapterMethod(Method):
    """A method that trains a LoRA adapter on a causal LM (every sft and dpo method)."""

    quantize: str | None = None
    """How the task loads the base for this method: None (float32) or "nf4" (4-bit, QLoRA)."""


class SFT(AdapterMethod):
    """LoRA on the float32 causal LM: only the adapter trains, on the answers of chat examples."""

    config: SFTConfig

    def fit(self, start: LMStart, data: TuningData, ctx: FitContext) -> FitResult:
        from ...engine.batches import LengthGrouped
        from ...llm.tokenize import IGNORE, pack_rows, pad_batch
        from ...llm.train import answer_loss, response_loss

        cfg = self.config
        model, bf16 = trainable_adapter(start, cfg, self.name, ctx.log)
        tokenizer = start.tokenizer
        train_rows, cut = encode_chats(tokenizer, data.train, cfg.max_length)
        held_rows, _ = encode_chats(tokenizer, data.held, cfg.max_length)
        if not train_rows:
            raise DataError(f"{data.source}: no training example keeps an answer within max_length={cfg.max_length}")
        if cfg.packing:
            train_rows = pack_rows(train_rows, cfg.max_length, tokenizer.eos_token_id)
        ctx.log(f"sft: {len(train_rows)} training {'blocks' if cfg.packing else 'examples'}, {len(held_rows)} held out "
                f"({len(data.skipped)} rows skipped, {cut} without an answer within max_length)")
        pad_id = tokenizer.pad_token_id
        before, _ = response_loss(model, held_rows, pad_id, cfg.batch_size, bf16)
        ctx.log(f"held-out loss before: {before:.4f}")

        def step_loss(batch_idx: list[int], progress: float):
            batch = pad_batch([train_rows[i] for i in batch_idx], pad_id)
            return answer_loss(model, batch), {}, int(batch["attention_mask"].sum())

        lengths = [len(r["input_ids"]) for r in train_rows]
        longest = [train_rows[max(range(len(lengths)), key=lengths.__getitem__)]]
        plan = memory_plan(model, lambda: answer_loss(model, pad_batch(longest, pad_id)), max(lengths), cfg, bf16, ctx)
        scored = [sum(t != IGNORE for t in r["labels"][1:]) for r in train_rows]  # the loss averages over these
        run = adapter_training(model, LengthGrouped(lengths, cfg.batch_size, cfg.epochs, ctx.seed), step_loss, cfg,
                               bf16, ctx, plan, loss_weight=lambda idx: sum(scored[i] for i in idx))
        after, tokens = response_loss(model, held_rows, pad_id, cfg.batch_size, bf16)
        ctx.log(f"held-out loss after: {after:.4f} (before {before:.4f})")
        # The held-out loss is taken here, on the rows trained against: the "before" exists only before training.
        held_out = {"eval_loss_before": before, "eval_loss": after, "eval_perplexity_before": perplexity(before),
                    "eval_perplexity": perplexity(after), "eval_examples": len(held_rows), "eval_tokens": tokens}
        return training_result(model, run, held_out, bf16, cfg)


class QloraSFT(SFT):
    """QLoRA: LoRA on the causal LM quantised to 4-bit NF4 (a third of the weight memory)."""

    quantize = "nf4"


def memory_plan(model, loss_of_costliest: Callable[[], Any], tokens: int, cfg: SFTConfig, bf16: bool,
                ctx: FitContext, sequences_per_example: int = 1) -> MemoryPlan:
    """Micro-batch and checkpointing of an sft/dpo run within the run's memory budget (llm/footprint.py)."""
    from ...llm.footprint import plan_adapter_memory
    from ...llm.train import autocast

    def one_example():
        with autocast(bf16):
            return loss_of_costliest()

    return plan_adapter_memory(model, one_example, tokens=tokens, batch_size=cfg.batch_size,
                               checkpointing=cfg.gradient_checkpointing, micro_batch=cfg.micro_batch,
                               budget=ctx.memory_budget, log=ctx.log, sequences_per_example=sequences_per_example)


def adapter_training(model, plan, step_loss, cfg: SFTConfig, bf16: bool, ctx: FitContext, memory: MemoryPlan,
                     loss_weight: Callable[[list[int]], float] | None = None):
    """The engine run of an sft/dpo method: the adapter's parameters, the config's rates, the run's checkpoints,
    the memory plan's micro-batches (`loss_weight`: a part's weight in the batch's mean loss)."""
    from ...engine.checkpoint import Checkpointer
    from ...llm.train import train_adapter

    return train_adapter(model, plan=plan, step_loss=step_loss, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         warmup_ratio=cfg.warmup_ratio, bf16=bf16, checkpoint_every=cfg.checkpoint_every,
                         checkpoint=Checkpointer(ctx.checkpoint_dir, fingerprint=ctx.fingerprint, resume=ctx.resume),
                         progress=ctx.progress, log=ctx.log,
                         micro_batch=memory.micro_batch if memory.accumulation > 1 else 0, loss_weight=loss_weight)


def training_result(model, run, held_out: dict[str, Any], bf16: bool, config: SFTConfig) -> FitResult:
    """The FitResult of a generative method: the held-out figures and throughput go to `details`."""
    return FitResult(model=model.eval(), history=run.history, train_s=run.train_s, config=config,
                     training=run.training_facts(), is_main_process=run.is_main_process,
                     details={**held_out, "tokens": run.total_count, "tokens_per_s": round(run.per_s, 1),
                              "bf16": bf16})


def encode_chats(tokenizer, examples, max_length: int) -> tuple[list[dict], int]:
    """(token rows that keep at least one answer token, how many were dropped for having none)."""
    from ...llm.tokenize import IGNORE, encode_chat

    rows = [encode_chat(tokenizer, ex.messages, max_length) for ex in examples]
    kept = [r for r in rows if any(t != IGNORE for t in r["labels"])]
    return kept, len(rows) - len(kept)

