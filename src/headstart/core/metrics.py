"""Classification metrics, computed from predicted and true class indices."""
from __future__ import annotations

import torch


def class_shares(labels, num_classes: int) -> torch.Tensor:
    """The share of each class among `labels` (class indices), [num_classes] floats summing to 1."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).float()
    return counts / counts.sum().clamp_min(1.0)


def confusion_matrix(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true class, predicted class] counts."""
    idx = true.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(pred: torch.Tensor, true: torch.Tensor, classes: list[str]) -> dict:
    """accuracy, macro-F1 (mean over classes present in `true` or `pred`), per-class F1, confusion."""
    cm = confusion_matrix(pred, true, len(classes)).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    present = (support > 0) | (predicted > 0)
    n = int(cm.sum().item())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "examples": n,
        "per_class_f1": {c: round(float(f1[i]), 4) for i, c in enumerate(classes)},
        "confusion": cm.long().tolist(),
    }
