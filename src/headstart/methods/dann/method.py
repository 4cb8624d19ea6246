from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...data import Dataset
from ...engine.schedule import warmup_cosine_schedule
from ..adaptation import AdaptationMethod
from ..adaptation_fit import fit_with_alignment
from ..base import FitContext, FitResult, SpecialistModel
from .config import DannConfig
from .modules import DannHead, DomainDiscriminator, ganin_lr_factor, grl_coefficient


class Dann(AdaptationMethod):
    """Domain-adversarial training: a gradient-reversal layer and a domain classifier (Ganin et al. 2016)."""

    config: DannConfig

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return DannHead(feature_dim, num_classes, self.config.bottleneck)

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        cfg = self.config
        torch.manual_seed(ctx.seed)
        disc = DomainDiscriminator(cfg.bottleneck or backbone.feature_dim, cfg.hidden)
        if cfg.lr_schedule == "ganin":
            schedule = lambda step, total: ganin_lr_factor(step / max(1, total))  # noqa: E731
        else:
            schedule = warmup_cosine_schedule(cfg.warmup_ratio)
        result = fit_with_alignment(self, backbone, data, ctx, make_loss=lambda method, model: _loss(method, model, disc),
                                    aux=disc, lr_schedule=schedule)
        result.details["final_domain_accuracy"] = result.history[-1].get("domain_acc") if result.history else None
        return result


def _loss(method: Dann, model: SpecialistModel, disc: DomainDiscriminator):
    cfg = method.config

    def step_loss(fs, ys, ft, p):
        head: DannHead = model.head
        zs, zt = head.bottleneck(torch.cat([fs, ft]).float()).split([len(fs), len(ft)])
        ce = F.cross_entropy(head.classifier(zs), ys, label_smoothing=cfg.label_smoothing)
        disc.reverse.coeff = grl_coefficient(p, cfg.gamma)
        logits = disc(torch.cat([zs, zt]))
        domain = torch.cat([torch.ones(len(zs)), torch.zeros(len(zt))]).to(logits.device)
        d_loss = F.binary_cross_entropy_with_logits(logits, domain)
        d_acc = ((logits > 0).float() == domain).float().mean().item()
        return ce + cfg.weight * d_loss, {"ce": ce.item(), "domain": d_loss.item(), "domain_acc": d_acc,
                                           "lambda": disc.reverse.coeff}

    return step_loss
