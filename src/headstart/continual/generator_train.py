"""How a generator (sft bundle) learns one more night on the engine: its current adapter made trainable
again, trained on the night's rows (+ replayed rows) with the strategies' hooks; and the held-out answer
loss the forgetting guard compares.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.errors import BundleError, DataError
from .generator_data import chat_messages


class GeneratorLearner:
    """One LMSpecialist being updated: encodes rows, measures loss, trains its adapter in place."""

    def __init__(self, spec):
        from ..methods.sft.config import SFTConfig

        self.spec = spec
        known = {k: v for k, v in spec.manifest["method"]["config"].items() if k in SFTConfig.__dataclass_fields__}
        self.cfg = SFTConfig.from_json(known)
        self.params = _make_trainable(spec.model)
        self.start = self.snapshot()
        """The adapter as the current version has it: the L2-SP/EWC anchor, and what a retry restarts from."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.copy_(state[k])

    def encode(self, rows: list[dict]) -> list[dict]:
        """Token rows that keep at least one answer token within max_length."""
        from ..methods.sft.method import encode_chats
        from ..llm.data import ChatExample

        encoded, _ = encode_chats(self.spec.tokenizer, [ChatExample(m) for m in chat_messages(rows)],
                                  self.cfg.max_length)
        return encoded

    def loss(self, rows: list[dict]) -> float | None:
        """Mean answer-token loss on `rows` (None without any)."""
        from ..llm.train import response_loss

        encoded = self.encode(rows)
        if not encoded:
            return None
        loss, _ = response_loss(self.spec.model, encoded, self.spec.tokenizer.pad_token_id, self.cfg.batch_size,
                                self.spec.bf16)
        return round(float(loss), 6)

    def fisher(self, rows: list[dict], max_examples: int, seed: int) -> dict[str, torch.Tensor]:
        """The true diagonal Fisher of the adapter on `rows` (answer tokens sampled from the model)."""
        from .fisher import fisher_diagonal, lm_sampled_nll

        encoded = self.encode(rows)
        if not encoded:
            return {}
        return fisher_diagonal(self.params, lm_sampled_nll(self.spec.model, encoded), n=len(encoded),
                               max_examples=max_examples, seed=seed, model=self.spec.model)

    def train(self, rows: list[dict], configs: dict, fisher: dict | None, ctx, opts) -> list[dict[str, Any]]:
        """Continued training of the adapter on `rows` with the strategies' penalties as engine hooks."""
        from ..engine.batches import LengthGrouped
        from ..engine.checkpoint import Checkpointer
        from ..engine.schedule import warmup_cosine_schedule
        from ..engine.trainer import TrainSettings, train
        from ..llm.tokenize import pad_batch
        from ..llm.train import answer_loss
        from .classifier import TimeBudget
        from .strategies import AnchorPenalty, without_weight_decay

        cfg, model = self.cfg, self.spec.model
        encoded = self.encode(rows)
        if not encoded:
            raise DataError(f"no training row keeps an answer within max_length={cfg.max_length}")
        hooks: list = []
        anchored: set[str] = set()
        if "l2sp" in configs:
            hooks.append(AnchorPenalty(self.params, self.start, None, configs["l2sp"].weight, name="l2sp"))
            anchored |= set(self.start)
        if "ewc" in configs and fisher:
            hooks.append(AnchorPenalty(self.params, self.start, fisher, configs["ewc"].weight, name="ewc"))
            anchored |= set(fisher)
        if opts.time_budget_s:
            hooks.append(TimeBudget(opts.time_budget_s, opts.log))
        groups = without_weight_decay([{"params": list(self.params.values()), "lr": cfg.lr,
                                        "weight_decay": cfg.weight_decay}], [self.params[k] for k in anchored])
        pad_id = self.spec.tokenizer.pad_token_id

        def step_loss(batch_idx: list[int], progress: float):
            batch = pad_batch([encoded[i] for i in batch_idx], pad_id)
            return answer_loss(model, batch), {}, int(batch["attention_mask"].sum())

        plan = LengthGrouped([len(r["input_ids"]) for r in encoded], cfg.batch_size, cfg.epochs, opts.seed)
        run = train(model, plan=plan, step_loss=step_loss, param_groups=groups,
                    settings=TrainSettings(lr_schedule=warmup_cosine_schedule(cfg.warmup_ratio), bf16=self.spec.bf16,
                                           checkpoint_every=cfg.checkpoint_every, log_every=10),
                    hooks=hooks, set_mode=lambda epoch: model.train(),
                    checkpoint=Checkpointer(ctx.checkpoint_dir, fingerprint=ctx.fingerprint, resume=ctx.resume),
                    progress=ctx.progress, log=ctx.log)
        model.eval()
        return run.history


def _make_trainable(model) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters, trainable again (PEFT loads a saved adapter frozen, in inference mode)."""
    for config in getattr(model, "peft_config", {}).values():
        config.inference_mode = False
    params = {}
    for name, p in model.named_parameters():
        is_adapter = "lora_" in name
        p.requires_grad_(is_adapter)
        if is_adapter:
            params[name] = p
    if not params:
        raise BundleError("this generator has no LoRA adapter to continue training")
    return params
