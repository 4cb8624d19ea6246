"""The label-free checks of an adaptation (experiments/adapt_checks.py), on synthetic features."""
from __future__ import annotations

import torch

from headstart.experiments.adapt_checks import agreement, reverse_accuracy, target_checks


def _two_blobs(n: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 16, generator=g) * 0.5
    x[:, 0] += 2.0 * y - 1.0
    return x + shift, y


def test_reverse_accuracy_rewards_right_target_labels_and_punishes_swapped_ones():
    source_x, source_y = _two_blobs(200, 0.0, 0)
    target_x, target_y = _two_blobs(200, 0.3, 1)  # a mild shift: the same classes, moved
    right = reverse_accuracy(target_x, target_y.tolist(), source_x, source_y.tolist(), 2)
    swapped = reverse_accuracy(target_x, (1 - target_y).tolist(), source_x, source_y.tolist(), 2)
    g = torch.Generator().manual_seed(2)
    noise = reverse_accuracy(target_x, torch.randint(0, 2, (200,), generator=g).tolist(), source_x,
                             source_y.tolist(), 2)
    assert right > 0.9 and swapped < 0.1, (right, swapped)
    assert 0.25 < noise < 0.75, noise  # labels unrelated to the inputs teach nothing


def test_a_collapsed_model_scores_the_source_share_of_its_one_class():
    source_x, source_y = _two_blobs(100, 0.0, 0)
    target_x, _ = _two_blobs(60, 0.3, 1)
    probs = torch.tensor([[0.9, 0.1]]).repeat(60, 1)
    checks = target_checks(probs, target_x, source_x, source_y.tolist())
    assert checks.largest_share == 1.0
    assert abs(checks.reverse_accuracy - (source_y == 0).float().mean().item()) < 1e-6


def test_entropy_is_normalised_and_agreement_counts_same_predictions():
    source_x, source_y = _two_blobs(100, 0.0, 0)
    target_x, target_y = _two_blobs(40, 0.0, 1)
    uniform = torch.full((40, 2), 0.5)
    uniform[torch.arange(40), target_y] += 1e-3  # argmax = the true class, entropy ~ 1
    checks = target_checks(uniform, target_x, source_x, source_y.tolist())
    assert abs(checks.entropy - 1.0) < 1e-3 and checks.largest_share == 0.5
    sure = torch.nn.functional.one_hot(target_y, 2).float()
    assert target_checks(sure, target_x, source_x, source_y.tolist()).entropy < 1e-6
    assert agreement(uniform, sure) == 1.0 and agreement(uniform, 1 - sure) == 0.0
