"""The end-of-fit report: one table for people, the same numbers as JSON for machines."""
from __future__ import annotations

from typing import Any

ROWS = [
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("trainable_params", "trainable parameters", "{:,}"),
    ("trainable_pct", "trainable % of base", "{:.3f}%"),
    ("wall_s", "wall time (s)", "{:.1f}"),
    ("train_s", "training time (s)", "{:.1f}"),
    ("examples_per_s", "training examples/s", "{:.1f}"),
    ("peak_mem_mb", "peak memory (MB)", "{:.0f}"),
    ("skipped", "files/rows skipped", "{}"),
]


def format_report(metrics: dict[str, Any], title: str) -> str:
    lines = [title, "-" * max(44, len(title))]
    split = metrics.get("split")
    for key, label, fmt in ROWS:
        if key not in metrics:
            continue
        name = f"{label} ({split})" if key in ("accuracy", "macro_f1") and split else label
        lines.append(f"{name:<32}{fmt.format(metrics[key])}")
    reasons = metrics.get("skipped_reasons") or {}
    for reason, count in reasons.items():
        lines.append(f"  {reason:<30}{count}")
    return "\n".join(lines)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The JSON `fit --json` prints on its last line."""
    keys = ("accuracy", "macro_f1", "split", "examples", "wall_s", "train_s", "trainable_params", "trainable_pct",
            "examples_per_s", "peak_mem_mb", "skipped", "skipped_reasons", "bundle")
    return {k: metrics[k] for k in keys if k in metrics}
