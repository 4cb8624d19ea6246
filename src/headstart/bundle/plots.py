"""PNG plots for the bundle: learning curves and the confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_learning_curves(history: list[dict], path: Path, title: str) -> bool:
    # Engine methods log one row per epoch (train_loss); step-wise methods (setfit's body) one per step (loss).
    xkey = "epoch" if any("epoch" in h for h in history) else "step"
    history = [h for h in history if xkey in h]
    epochs = [h[xkey] for h in history]
    if not epochs:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h.get("train_loss", h.get("loss")) for h in history], "o-" if xkey == "epoch" else "-",
            label="train loss")
    if any("val_loss" in h for h in history):
        ax.plot(epochs, [h.get("val_loss") for h in history], "o-", label="validation loss")
    ax.set_xlabel(xkey)
    ax.set_ylabel("loss")
    if any("val_accuracy" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_accuracy") for h in history], "s--", color="tab:green",
                 label="validation accuracy")
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    n = len(classes)
    size = min(12, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = max(max(r) for r in confusion) or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=8,
                        color="white" if confusion[i][j] > peak / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
