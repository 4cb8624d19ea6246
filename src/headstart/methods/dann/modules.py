"""DANN's parts: gradient reversal, its schedule, the bottleneck head and the domain discriminator."""
from __future__ import annotations

import math

import torch
from torch import nn


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


class GradientReversal(nn.Module):
    """Identity forward; multiplies the gradient by -coeff backward, so the features learn to *fool*
    the domain discriminator that learns, through the same loss, to tell the domains apart."""

    def __init__(self):
        super().__init__()
        self.coeff = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGrad.apply(x, self.coeff)


def grl_coefficient(progress: float, gamma: float = 10.0) -> float:
    """lambda_p = 2 / (1 + exp(-gamma p)) - 1: 0 at the start (the discriminator's signal is noise then),
    rising to ~1 (Ganin et al. 2016, section 5.2.2)."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def ganin_lr_factor(progress: float) -> float:
    """mu_p = mu_0 / (1 + 10 p)^0.75 (Ganin et al. 2016)."""
    return 1.0 / (1.0 + 10.0 * progress) ** 0.75


class DannHead(nn.Module):
    """Bottleneck (Linear-BN-ReLU) then a linear classifier; `bottleneck=0` is a plain linear head."""

    def __init__(self, feature_dim: int, num_classes: int, bottleneck: int = 256):
        super().__init__()
        if bottleneck:
            self.bottleneck = nn.Sequential(nn.Linear(feature_dim, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU())
        else:
            self.bottleneck = nn.Identity()
        self.classifier = nn.Linear(bottleneck or feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, C]
        return self.classifier(self.bottleneck(features))


class DomainDiscriminator(nn.Module):
    """Two hidden Linear-BN-ReLU layers -> one logit: source (1) or target (0), behind a gradient reversal."""

    def __init__(self, in_dim: int, hidden: int = 1024):
        super().__init__()
        self.reverse = GradientReversal()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, in_dim] -> [B] logits
        return self.net(self.reverse(z)).squeeze(-1)
