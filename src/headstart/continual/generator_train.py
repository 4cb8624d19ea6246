"""How a generator (sft bundle) learns one more night on the engine: its current adapter made trainable
again, trained on the night's rows (+ replayed rows) with the strategies' hooks; and the held-out answer
loss the forgetting guard compares.

LwF here distils the previous adapter's next-token distributions at the answer positions: the teacher is
the same model run with the previous adapter's weights swapped in by `torch.func.functional_call` (no
second model in memory, no in-place change the student's backward would trip on), once per step.
`joint` starts a fresh adapter (PEFT's own initialisation) and trains it on everything the memory holds.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import BundleError, DataError
from ..engine.trainer import Hook, RunState
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

    @torch.no_grad()
    def fresh_adapter(self, seed: int) -> None:
        """Re-initialise the adapter as PEFT makes a new one (B = 0: the model is the base again)."""
        torch.manual_seed(seed)
        for module in self.spec.model.modules():
            if hasattr(module, "reset_lora_parameters") and self.spec.adapter_name in getattr(module, "lora_A", {}):
                module.reset_lora_parameters(self.spec.adapter_name, True)

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
        outputs: dict = {}
        if "lwf" in configs:
            hooks.append(AnswerDistillation(model, outputs, self.start, configs["lwf"].weight,
                                            configs["lwf"].temperature))
        if opts.time_budget_s:
            hooks.append(TimeBudget(opts.time_budget_s, opts.log))
        groups = without_weight_decay([{"params": list(self.params.values()), "lr": cfg.lr,
                                        "weight_decay": cfg.weight_decay}], [self.params[k] for k in anchored])
        pad_id = self.spec.tokenizer.pad_token_id

        def step_loss(batch_idx: list[int], progress: float):
            batch = pad_batch([encoded[i] for i in batch_idx], pad_id)
            logits, targets = answer_logits(model, batch)
            outputs.update(logits=logits, batch=batch)  # what the LwF hook distils
            return F.cross_entropy(logits.float(), targets), {}, int(batch["attention_mask"].sum())

        torch.manual_seed(opts.seed)  # the adapter's dropout draws: a rerun (or a resumed run) repeats them
        epochs = opts.epochs or cfg.epochs
        plan = LengthGrouped([len(r["input_ids"]) for r in encoded], cfg.batch_size, epochs, opts.seed)
        run = train(model, plan=plan, step_loss=step_loss, param_groups=groups,
                    settings=TrainSettings(lr_schedule=warmup_cosine_schedule(cfg.warmup_ratio), bf16=self.spec.bf16,
                                           checkpoint_every=cfg.checkpoint_every, log_every=10),
                    hooks=hooks, set_mode=lambda epoch: model.train(),
                    checkpoint=Checkpointer(ctx.checkpoint_dir, fingerprint=ctx.fingerprint, resume=ctx.resume),
                    progress=ctx.progress, log=ctx.log)
        model.eval()
        return run.history


def answer_logits(model, batch: dict[str, torch.Tensor], trunk_params: dict[str, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """([N_answer, vocab] logits, [N_answer] targets) at the answer positions (`llm.train.answer_loss`'s
    computation, logits kept); `trunk_params` (names relative to the decoder trunk) replace the model's."""
    from ..llm.tokenize import IGNORE

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if trunk_params is None:
        hidden = lm.model(**kwargs).last_hidden_state
    else:
        hidden = torch.func.functional_call(lm.model, trunk_params, args=(), kwargs=kwargs).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return lm.lm_head(hidden[:, :-1][keep]), targets[keep]


TRUNK_PREFIX = "base_model.model.model."
"""How a PeftModel names the decoder trunk's parameters (the LoRA layers all-linear adds live there)."""


class AnswerDistillation(Hook):
    """LwF for a generator: weight * T^2 * KL(previous adapter's softened next-token distribution || the
    student's), averaged over the batch's answer tokens. The step loss puts the student's answer logits
    and the padded batch into `outputs`."""

    name = "lwf"

    def __init__(self, model, outputs: dict, anchor: dict[str, torch.Tensor], weight: float, temperature: float):
        self.model, self.outputs = model, outputs
        self.weight, self.temperature = float(weight), float(temperature)
        self.teacher = {k[len(TRUNK_PREFIX):]: v for k, v in anchor.items() if k.startswith(TRUNK_PREFIX)}

    def extra_loss(self, run: RunState, batch) -> torch.Tensor | None:
        if self.weight == 0 or not self.teacher:
            return None
        student = self.outputs["logits"]
        if next(iter(self.teacher.values())).device != student.device:  # the engine moved the model
            self.teacher = {k: v.to(student.device) for k, v in self.teacher.items()}
        was_training = self.model.training
        self.model.eval()  # the teacher without dropout
        with torch.no_grad():
            teacher, _ = answer_logits(self.model, self.outputs["batch"], self.teacher)
        self.model.train(was_training)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                      reduction="batchmean", log_target=True)
        return self.weight * t * t * kl


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
