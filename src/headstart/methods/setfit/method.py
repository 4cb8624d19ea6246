from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...data import Dataset
from ...engine.batches import ClassBalanced
from ...engine.checkpoint import Checkpointer, copy_state_into
from ...engine.features import encode
from ...engine.schedule import warmup_cosine_schedule
from ...engine.trainer import TrainResult, TrainSettings, train
from ..base import ADAPTER_DIR, FitContext, FitResult, Method, SpecialistModel, loader_for
from ..heads import set_linear
from ..probe.method import fit_head_with_l2_search
from .config import SetFitConfig

class SetFit(Method):
    """Contrastive body tuning on all in-batch pairs of the few examples, then a linear head (SetFit's two phases)."""

    config: SetFitConfig

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        cfg = self.config.resolved(backbone.kind)
        train_split = data.split("train")
        num_classes = len(data.classes)
        torch.manual_seed(ctx.seed)
        body = _wrap(backbone, cfg.r) if cfg.lora else backbone
        model = SpecialistModel(body, num_classes, normalize=True)
        load = loader_for(backbone.kind)
        t0 = time.perf_counter()
        body = train_body(model, train_split.items, train_split.labels, load, cfg, ctx)
        history = body.history if body else []
        body_s = time.perf_counter() - t0
        # Phase 2: a logistic-regression head on the tuned body's unit-length embeddings.
        model.eval()
        x = F.normalize(encode(model.backbone, train_split.items, load, 64, ctx.progress, desc="embeddings"), dim=-1)
        w, b, l2, grid = fit_head_with_l2_search(x, train_split.labels, num_classes, cfg.l2_grid, seed=ctx.seed)
        set_linear(model.head, w, b)
        train_s = time.perf_counter() - t0
        return FitResult(model=model, history=history, train_s=train_s, config=cfg,
                         training=body.training_facts() if body else {},
                         is_main_process=body.is_main_process if body else True,
                         examples_per_s=len(train_split) * max(1, len(history)) / max(body_s, 1e-9) if history else 0.0,
                         details={"body_steps": len(history), "body_s": round(body_s, 3), "l2": l2,
                                  "l2_grid_holdout_accuracy": grid, "lora": cfg.lora})

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


def _wrap(backbone, r: int):
    from peft import LoraConfig, get_peft_model

    backbone.name_or_path = backbone.info.name  # PEFT records this as the adapter's base model
    return get_peft_model(backbone, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                               target_modules=backbone.lora_target_modules(), bias="none",
                                               base_model_name_or_path=backbone.info.name))


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
               ctx: FitContext) -> TrainResult | None:
    """Phase 1: contrastive steps on the backbone over class-balanced batches (one history row per step);
    None when there is nothing to contrast (one class, or no steps asked for)."""
    if len(set(labels)) < 2 or cfg.epochs == 0 or cfg.max_steps == 0:
        return None
    steps = min(cfg.max_steps, max(1, math.ceil(cfg.epochs * len(items) / cfg.batch_size)))
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "lr": cfg.lr, "weight_decay": 0.0}]
    base = model.base

    def set_mode(epoch: int) -> None:
        model.backbone.train()
        if base.kind == "image":
            base.freeze_batchnorm()  # tiny class-balanced batches would only make the statistics noisier

    def step(idx: list[int], progress: float):
        device = next(iter(params)).device
        batch = base.collate([load(items[i]) for i in idx], True)
        emb = model.backbone(**{k: v.to(device) for k, v in batch.items()})
        return pair_loss(emb, torch.tensor([labels[i] for i in idx], device=device)), {}, len(idx)

    # A checkpoint holds the whole body and its Adam state when it trains (not LoRA), 0.1-0.7 s to write
    # for minilm-l6: one in the middle of a long run and one at its end, not one every few steps.
    return train(model.backbone, plan=ClassBalanced(labels, cfg.batch_size, steps, ctx.seed), step_loss=step,
                param_groups=[g for g in groups if g["params"]],
                settings=TrainSettings(lr_schedule=warmup_cosine_schedule(cfg.warmup_ratio), log_every=1,
                                       checkpoint_every=max(50, math.ceil(steps / 2))),
                set_mode=set_mode,
                checkpoint=Checkpointer(ctx.checkpoint_dir, fingerprint=ctx.fingerprint, resume=ctx.resume),
                progress=ctx.progress, log=ctx.log)
