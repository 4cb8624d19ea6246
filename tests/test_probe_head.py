"""The probe's closed-form head: an isotropic L2 penalty on centred features, chosen by holdout cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from headstart.methods.probe.method import fit_head_with_l2_search, fit_linear_head


def _signal_and_faint_noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One strong dimension carries the label; 300 faint ones (sd 0.01) carry only noise, as an
    embedding's low-variance directions do."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    signal = (2.0 * y - 1.0 + 0.8 * torch.randn(n, generator=g)).unsqueeze(1)
    noise = 0.01 * torch.randn(n, 300, generator=g)
    return torch.cat([signal, noise], 1) + 5.0, y  # an offset too: the head must centre


def test_faint_noise_dimensions_are_not_blown_up_to_the_signals_size():
    x, y = _signal_and_faint_noise(80, 0)
    test_x, test_y = _signal_and_faint_noise(2000, 1)
    w, b = fit_linear_head(x, y, 2, l2=1e-2)
    accuracy = ((test_x @ w.T + b).argmax(-1) == test_y).float().mean().item()
    # Per-dimension standardisation made the 300 noise dimensions as large as the signal: 80 examples
    # then fit the noise (0.62 on this draw). The best possible here is ~0.89 (Bayes rate of the signal).
    assert accuracy >= 0.85, accuracy
    spread = x.std(0)
    weight = (w[1] - w[0]).abs() * spread  # what each dimension adds to the logit gap, per standard deviation
    assert weight[0] > 10 * weight[1:].max(), (weight[0], weight[1:].max())


def test_the_head_applies_to_raw_features_and_minimises_the_penalised_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g) * torch.linspace(0.1, 3, 8) + 2.0
    y = torch.randint(0, 3, (120,), generator=g)
    l2 = 0.05
    w, b = fit_linear_head(x, y, 3, l2)
    mean, scale = x.double().mean(0), x.double().std(0).square().mean().sqrt()
    wz = (w.double() * scale).requires_grad_(True)  # the weights in the solver's centred, scaled space
    bz = (b.double() + w.double() @ mean).requires_grad_(True)
    loss = F.cross_entropy(((x.double() - mean) / scale) @ wz.T + bz, y) + 0.5 * l2 * (wz * wz).sum()
    loss.backward()
    assert wz.grad.abs().max() < 1e-4 and bz.grad.abs().max() < 1e-4  # a stationary point of that objective


def test_the_l2_search_picks_the_lowest_holdout_cross_entropy():
    x, y = _signal_and_faint_noise(200, 2)
    grid = [1e-4, 1e-2, 1.0, 100.0]
    _, _, chosen, accuracy = fit_head_with_l2_search(x, y.tolist(), 2, grid, seed=0)
    assert set(accuracy) == {str(c) for c in grid}
    assert chosen != 100.0  # a head shrunk to nothing has the worst cross-entropy however its accuracy ties
