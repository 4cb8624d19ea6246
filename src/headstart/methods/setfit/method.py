from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...data import Dataset
from ...engine.checkpoint import copy_state_into
from ...engine.features import encode
from ...engine.schedule import warmup_cosine
from ..base import FitContext, FitResult, Method, SpecialistModel, loader_for
from ..probe.method import fit_head_with_l2_search
from .config import SetFitConfig

ADAPTER_DIR = "adapter"


class SetFit(Method):
    """Contrastive body tuning on all in-batch pairs of the few examples, then a linear head (SetFit's two phases)."""

    config: SetFitConfig

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        cfg = self.config = self.config.resolved(backbone.kind)
        train = data.split("train")
        num_classes = len(data.classes)
        torch.manual_seed(ctx.seed)
        body = self._wrap(backbone) if cfg.lora else backbone
        model = SpecialistModel(body, num_classes, normalize=True)
        load = loader_for(backbone.kind)
        t0 = time.perf_counter()
        history = train_body(model, train.items, train.labels, load, cfg, ctx)
        body_s = time.perf_counter() - t0
        # Phase 2: a logistic-regression head on the tuned body's unit-length embeddings.
        model.eval()
        x = F.normalize(encode(model.backbone, train.items, load, 64, ctx.progress, desc="embeddings"), dim=-1)
        w, b, l2, grid = fit_head_with_l2_search(x, train.labels, num_classes, cfg.l2_grid, seed=ctx.seed)
        with torch.no_grad():
            model.head.weight.copy_(w)
            model.head.bias.copy_(b)
        train_s = time.perf_counter() - t0
        return FitResult(model=model, history=history, train_s=train_s,
                         examples_per_s=len(train) * max(1, len(history)) / max(body_s, 1e-9) if history else 0.0,
                         details={"body_steps": len(history), "body_s": round(body_s, 3), "l2": l2,
                                  "l2_grid_holdout_accuracy": grid, "lora": cfg.lora})

    def _wrap(self, backbone):
        from peft import LoraConfig, get_peft_model

        backbone.name_or_path = backbone.info.name  # PEFT records this as the adapter's base model
        return get_peft_model(backbone, LoraConfig(r=self.config.r, lora_alpha=2 * self.config.r, lora_dropout=0.0,
                                                   target_modules=backbone.lora_target_modules(), bias="none",
                                                   base_model_name_or_path=backbone.info.name))

    # ---- bundle -------------------------------------------------------------------------------
    def trained_state(self, model: SpecialistModel) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in model.head.state_dict(prefix="head.").items()}
        state["center"] = model.center.detach()
        if not self.config.lora:  # the whole tuned body (its frozen buffers included: BN statistics)
            state.update({f"backbone.{k}": v.detach() for k, v in model.backbone.state_dict().items()})
        return state

    def save_artifacts(self, model: SpecialistModel, folder: Path, base_name: str) -> None:
        if self.config.lora:
            model.backbone.peft_config["default"].base_model_name_or_path = base_name
            model.backbone.save_pretrained(str(folder / ADAPTER_DIR), save_embedding_layers=False)

    def restore(self, backbone, num_classes: int, state: dict[str, torch.Tensor], folder: Path) -> SpecialistModel:
        body = backbone
        if self.config.lora:
            from peft import PeftModel

            backbone.name_or_path = backbone.info.name
            body = PeftModel.from_pretrained(backbone, str(folder / ADAPTER_DIR))
        model = SpecialistModel(body, num_classes, normalize=True)
        copy_state_into(model, state)
        return model.eval()


def balanced_batches(labels: list[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices, each drawing evenly from every class (so each batch has positive
    pairs), cycling through each class's examples in a seeded shuffled order."""
    rng = random.Random(seed)
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels))]
    queues: list[list[int]] = [[] for _ in by_class]
    per_class = max(2, batch_size // len(by_class))
    batches = []
    for _ in range(steps):
        batch: list[int] = []
        for c, members in enumerate(by_class):
            take = min(per_class, len(members))
            for _ in range(take):
                if not queues[c]:
                    queues[c] = rng.sample(members, len(members))
                batch.append(queues[c].pop())
        batches.append(sorted(set(batch)))
    return batches


def pair_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SetFit's CosineSimilarityLoss -- (cos(u, v) - [same class])^2 -- over every pair in the batch,
    positive and negative pairs weighted equally (SetFit balances them by oversampling)."""
    z = F.normalize(emb.float(), dim=-1)
    cos = z @ z.T  # [B, B]
    same = labels[:, None] == labels[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    pos, neg = same & upper, ~same & upper
    loss = cos.new_zeros(())
    if pos.any():
        loss = loss + ((cos[pos] - 1) ** 2).mean()
    if neg.any():
        loss = loss + (cos[neg] ** 2).mean()
    return loss / (int(pos.any()) + int(neg.any()) or 1)


def train_body(model: SpecialistModel, items: list, labels: list[int], load, cfg: SetFitConfig,
               ctx: FitContext) -> list[dict[str, float]]:
    """Phase 1: contrastive steps on the backbone; returns one history row per step."""
    n_classes = len(set(labels))
    if n_classes < 2 or cfg.epochs == 0 or cfg.max_steps == 0:
        return []
    steps = min(cfg.max_steps, max(1, math.ceil(cfg.epochs * len(items) / cfg.batch_size)))
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = warmup_cosine(opt, steps, round(cfg.warmup_ratio * steps))
    base = model.base
    model.backbone.train()
    if base.kind == "image":
        base.freeze_batchnorm()  # tiny class-balanced batches would only make the statistics noisier
    history = []
    bar = tqdm(balanced_batches(labels, cfg.batch_size, steps, ctx.seed), disable=not ctx.progress,
               file=sys.stderr, desc="setfit body", unit="step", dynamic_ncols=True)
    for step, idx in enumerate(bar):
        batch = base.collate([load(items[i]) for i in idx], True)
        loss = pair_loss(model.backbone(**batch), torch.tensor([labels[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": round(loss.item(), 5)})
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.backbone.eval()
    return history
