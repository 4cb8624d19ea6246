"""Label-free checks of an adaptation: does the adapted model look worse on the target than source-only?

A user adapting to an unlabelled domain cannot measure target accuracy, and adaptation can hurt (a
self-trained head that confirms its own mistakes, an aligner that scrambles a shift it was not built
for). These checks use the target's inputs and the labelled source only:

    estimated accuracy  average thresholded confidence (ATC, Garg et al. 2022): the confidence threshold
                      above which the held-out source has as many examples as it has right answers; the
                      share of the target above it estimates the target accuracy. Capped by the class
                      share bound. The guard decides by it.
    class share bound the most a model can get right if the target has the source's class shares (the
                      assumption covariate-shift adaptation makes): sum over classes of min(predicted
                      share, source share). A model that answers one class for 70% of a target of 20
                      equally common classes scores at most 0.35, whatever its confidence says.
    reverse accuracy  reverse validation (Zhong et al. 2010; the DANN paper chose its settings with it): a
                      linear head is trained on the target's base features with the model's own target
                      predictions as labels, then scored on the labelled source. Target labels that are
                      wrong in a systematic way teach a head that fails on the source.
    entropy           mean prediction entropy on the target, normalised to [0, 1] (1: uniform).
    largest share     the share of the target predicted as the commonest class: a collapse onto one class
                      shows here whatever the entropy says.
    agreement         the share of target inputs on which two models predict the same class (the adapted
                      model and source-only: how much the adaptation changed).

The reverse head always sees the untouched base's features (cached), whatever the adapted model trained
(a head, LoRA adapters, top blocks): one fixed yardstick for every model of a run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class TargetChecks:
    estimated_accuracy: float
    class_share_bound: float
    reverse_accuracy: float
    entropy: float
    largest_share: float
    agreement: float

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def target_checks(target_probs: torch.Tensor, held_out_probs: torch.Tensor, held_out_labels: list[int],
                  source_only_probs: torch.Tensor, target_features: torch.Tensor, source_features: torch.Tensor,
                  source_shares: torch.Tensor, seed: int = 0) -> TargetChecks:
    """The checks of one model from its class probabilities on the target ([N, C]) and on the held-out
    labelled source, beside source-only's target probabilities; `target_features` / `source_features`
    are the untouched base's (the held-out source's, labelled by `held_out_labels`); `source_shares`
    the class shares of the labelled source ([C])."""
    probs = target_probs.float()
    n, num_classes = probs.shape
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean().item() / math.log(num_classes)
    predicted = probs.argmax(1)
    shares = torch.bincount(predicted, minlength=num_classes).float() / max(n, 1)
    bound = torch.minimum(shares, source_shares.float()).sum().item()
    return TargetChecks(estimated_accuracy=min(estimated_accuracy(held_out_probs, held_out_labels, probs), bound),
                        class_share_bound=bound,
                        reverse_accuracy=reverse_accuracy(target_features, predicted.tolist(), source_features,
                                                          held_out_labels, num_classes, seed),
                        entropy=entropy, largest_share=shares.max().item(),
                        agreement=agreement(probs, source_only_probs))


def estimated_accuracy(held_out_probs: torch.Tensor, held_out_labels: list[int], target_probs: torch.Tensor) -> float:
    """The target accuracy a model's confidences predict (ATC with the maximum probability as the score).

    The threshold t is set so the share of held-out source examples more confident than t equals the
    model's held-out source accuracy; the estimate is the share of target examples more confident than t.
    Each model gets its own threshold, so a model made overconfident by training on its own guesses
    (self-training) is judged against its own calibration on the source, not against source-only's.
    """
    held_out = held_out_probs.float()
    if len(held_out) == 0 or len(target_probs) == 0:
        raise ValueError("estimated_accuracy needs held-out source and target probabilities")
    right = (held_out.argmax(1) == torch.as_tensor(held_out_labels)).float().mean().item()
    confidence = held_out.max(1).values
    threshold = torch.quantile(confidence, 1.0 - right).item() if right < 1.0 else confidence.min().item() - 1e-9
    return (target_probs.float().max(1).values > threshold).float().mean().item()


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


def choose(checks: dict[str, TargetChecks]) -> tuple[str, str]:
    """The model to ship and why: the highest estimated target accuracy; source-only unless another model's
    estimate is strictly higher (a tie keeps the model that did not touch the target).

    Measured on bench/adapt.py's 16 shifts x 3-4 methods (README), the estimate ranks adaptations better
    than reverse accuracy (biased toward source-only on a fixed representation: selftrain lowered it on 12
    of 12 text shifts while gaining up to 8 points), entropy, information maximisation, SND or DEV; those
    that are cheap are reported, not decided on.
    """
    if "source-only" not in checks:
        raise ValueError("choose needs source-only's checks to compare against")
    kept = checks["source-only"].estimated_accuracy
    best = max(checks, key=lambda name: (checks[name].estimated_accuracy, name == "source-only"))
    others = ", ".join(f"{n} {c.estimated_accuracy:.3f}" for n, c in checks.items() if n not in (best, "source-only"))
    rest = f"; {others}" if others else ""
    if best == "source-only":
        return best, (f"kept source-only: its estimated target accuracy {kept:.3f} is not beaten{rest} "
                      "(an adaptation that looks harmful is not shipped)")
    return best, (f"{best}: estimated target accuracy {checks[best].estimated_accuracy:.3f} vs source-only's "
                  f"{kept:.3f}{rest}")
