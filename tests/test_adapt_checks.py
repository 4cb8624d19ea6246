"""The label-free checks of an adaptation (experiments/adapt_checks.py), on synthetic features."""
from __future__ import annotations

import pytest
import torch

from headstart.experiments.adapt_checks import (TargetChecks, agreement, choose, estimated_accuracy, reverse_accuracy,
                                                target_checks)


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


def _checks(target_probs, source_x, source_y, target_x, source_only=None):
    """target_checks with a held-out source the model gets fully right at 0.9 confidence."""
    held_out = torch.nn.functional.one_hot(source_y, 2).float() * 0.8 + 0.1
    return target_checks(target_probs, held_out, source_y.tolist(),
                         target_probs if source_only is None else source_only, target_x, source_x,
                         torch.tensor([0.5, 0.5]))


def test_a_collapsed_model_scores_the_source_share_of_its_one_class():
    source_x, source_y = _two_blobs(100, 0.0, 0)
    target_x, _ = _two_blobs(60, 0.3, 1)
    probs = torch.tensor([[0.95, 0.05]]).repeat(60, 1)
    checks = _checks(probs, source_x, source_y, target_x)
    assert checks.largest_share == 1.0 and checks.agreement == 1.0
    # half the target at most can be class 0 when the target has the source's shares: the bound says so,
    # and caps the estimate of 1.0 that its confidence (surer than on the source, all right there) gives
    assert checks.class_share_bound == 0.5 and checks.estimated_accuracy == 0.5
    assert abs(checks.reverse_accuracy - (source_y == 0).float().mean().item()) < 1e-6


def test_entropy_is_normalised_and_agreement_counts_same_predictions():
    source_x, source_y = _two_blobs(100, 0.0, 0)
    target_x, target_y = _two_blobs(40, 0.0, 1)
    uniform = torch.full((40, 2), 0.5)
    uniform[torch.arange(40), target_y] += 1e-3  # argmax = the true class, entropy ~ 1
    checks = _checks(uniform, source_x, source_y, target_x)
    assert abs(checks.entropy - 1.0) < 1e-3 and checks.largest_share == 0.5
    sure = torch.nn.functional.one_hot(target_y, 2).float()
    assert _checks(sure, source_x, source_y, target_x).entropy < 1e-6
    assert agreement(uniform, sure) == 1.0 and agreement(uniform, 1 - sure) == 0.0
    assert _checks(1 - sure, source_x, source_y, target_x, source_only=sure).agreement == 0.0


def _confident(confidences: list[float], right: list[bool]) -> tuple[torch.Tensor, list[int]]:
    """Two-class probabilities with these confidences; labels the model gets right where `right` says."""
    probs = torch.tensor([[c, 1 - c] for c in confidences])
    return probs, [0 if r else 1 for r in right]


def test_estimated_accuracy_carries_the_source_threshold_to_the_target():
    # Held-out source: 80 right at 0.9 confidence, 20 wrong at 0.6 -> accuracy 0.8; the threshold falls
    # between 0.6 and 0.9, so the estimate is the target's share above 0.6.
    held_out, labels = _confident([0.9] * 80 + [0.6] * 20, [True] * 80 + [False] * 20)
    target, _ = _confident([0.9] * 30 + [0.6] * 70, [True] * 100)
    assert estimated_accuracy(held_out, labels, target) == pytest.approx(0.3)
    same, _ = _confident([0.9] * 80 + [0.6] * 20, [True] * 100)
    assert estimated_accuracy(held_out, labels, same) == pytest.approx(0.8)  # no shift: the source accuracy
    perfect = torch.tensor([[0.7, 0.3]] * 10)  # every held-out answer right: the cut is the least confident one
    target = torch.tensor([[0.8, 0.2]] * 3 + [[0.55, 0.45]] * 2)
    assert estimated_accuracy(perfect, [0] * 10, target) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="held-out source and target"):
        estimated_accuracy(held_out[:0], [], target)


def _verdict(**estimates: float) -> TargetChecks:
    return {name.replace("_", "-"): TargetChecks(estimated_accuracy=e, class_share_bound=1.0, reverse_accuracy=0.5,
                                                 entropy=0.5, largest_share=0.5, agreement=1.0)
            for name, e in estimates.items()}


def test_choose_ships_the_highest_estimate_and_keeps_source_only_on_a_tie():
    shipped, why = choose(_verdict(source_only=0.70, coral=0.65, selftrain=0.74))
    assert shipped == "selftrain" and "0.740" in why and "0.700" in why and "coral 0.650" in why
    shipped, why = choose(_verdict(source_only=0.70, selftrain=0.70))
    assert shipped == "source-only" and why.startswith("kept source-only")
    shipped, why = choose(_verdict(source_only=0.70, dann=0.60))
    assert shipped == "source-only" and "dann 0.600" in why
    with pytest.raises(ValueError, match="source-only"):
        choose(_verdict(coral=0.9))
