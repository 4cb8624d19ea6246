"""CORAL maths as pure tensor functions."""
from __future__ import annotations

import torch


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance [D, D] of rows x [N, D]."""
    centred = x - x.mean(0, keepdim=True)
    return centred.T @ centred / max(1, x.shape[0] - 1)


def matrix_power(c: torch.Tensor, power: float) -> torch.Tensor:
    """c ** power for a symmetric positive-definite matrix, by eigendecomposition."""
    values, vectors = torch.linalg.eigh(c)
    return (vectors * values.clamp_min(1e-12) ** power) @ vectors.T


def coral_transform(xs: torch.Tensor, xt: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Source features re-coloured to the target's mean and covariance (CORAL, Sun et al. 2016).

    xs' = (xs - mu_s) Cs^(-1/2) Ct^(1/2) + mu_t, with Cs, Ct ridged by eps x their mean variance. A
    classifier trained on xs' applies to raw target features: nothing is added at prediction time.
    """
    xs64, xt64 = xs.double(), xt.double()
    eye = torch.eye(xs.shape[1], dtype=torch.float64)
    cs, ct = covariance(xs64), covariance(xt64)
    cs = cs + eps * cs.diagonal().mean() * eye
    ct = ct + eps * ct.diagonal().mean() * eye
    whiten_recolour = matrix_power(cs, -0.5) @ matrix_power(ct, 0.5)
    out = (xs64 - xs64.mean(0)) @ whiten_recolour + xt64.mean(0)
    return out.to(xs.dtype)


def coral_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Deep CORAL loss: ||Cs - Ct||_F^2 / (4 d^2) between batch feature covariances (Sun & Saenko 2016)."""
    d = fs.shape[1]
    diff = covariance(fs.float()) - covariance(ft.float())
    return (diff * diff).sum() / (4 * d * d)
