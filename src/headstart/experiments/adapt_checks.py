"""Label-free checks of an adaptation: does the adapted model look worse on the target than source-only?

A user adapting to an unlabelled domain cannot measure target accuracy, and adaptation can hurt (a
self-trained head that confirms its own mistakes, an aligner that scrambles a shift it was not built
for). These checks use the target's inputs and the labelled source only:

    reverse accuracy  reverse validation (Zhong et al. 2010; the DANN paper chose its settings with it): a
                      linear head is trained on the target's base features with the model's own target
                      predictions as labels, then scored on the labelled source. Target labels that are
                      wrong in a systematic way teach a head that fails on the source.
    entropy           mean prediction entropy on the target, normalised to [0, 1] (1: uniform).
    largest share     the share of the target predicted as the commonest class: a collapse onto one class
                      shows here whatever the entropy says.
    agreement         the share of target inputs on which two models predict the same class.

The reverse head always sees the untouched base's features (cached), whatever the adapted model trained
(a head, LoRA adapters, top blocks): one fixed yardstick for every model of a run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class TargetChecks:
    reverse_accuracy: float
    entropy: float
    largest_share: float

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def target_checks(target_probs: torch.Tensor, target_features: torch.Tensor, source_features: torch.Tensor,
                  source_labels: list[int], seed: int = 0) -> TargetChecks:
    """The checks of one model from its class probabilities on the target ([N, C])."""
    probs = target_probs.float()
    n, num_classes = probs.shape
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean().item() / math.log(num_classes)
    predicted = probs.argmax(1)
    shares = torch.bincount(predicted, minlength=num_classes).float() / max(n, 1)
    return TargetChecks(reverse_accuracy=reverse_accuracy(target_features, predicted.tolist(), source_features,
                                                          source_labels, num_classes, seed),
                        entropy=entropy, largest_share=shares.max().item())


def reverse_accuracy(target_features: torch.Tensor, target_predictions: list[int], source_features: torch.Tensor,
                     source_labels: list[int], num_classes: int, seed: int = 0) -> float:
    """Accuracy on the labelled source of a linear head trained on the target with `target_predictions`.

    A model that predicts a single class teaches nothing: its reverse head answers that class, and scores
    the source's share of it.
    """
    from ..methods.heads import L2_GRID
    from ..methods.probe.method import fit_head_with_l2_search

    y = torch.tensor(source_labels)
    if len(set(target_predictions)) < 2:
        return (y == target_predictions[0]).float().mean().item() if target_predictions else 0.0
    w, b, _, _ = fit_head_with_l2_search(target_features, target_predictions, num_classes, list(L2_GRID), seed=seed)
    return ((source_features @ w.T + b).argmax(1) == y).float().mean().item()


def agreement(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    """Share of inputs on which two models predict the same class."""
    return (probs_a.argmax(1) == probs_b.argmax(1)).float().mean().item()
