"""The held-out data a merge is judged on, and its scores: per task, with the old heads or refitted ones.

Each task's data is the user's (`data=`) or the specialist's recorded training data (the manifest's
`data.source`) when it is still there. Choices (greedy soups, `auto`, refit or not) are made on the
selection split (`val`; never the test split); the report gives the evaluation split (`test`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.errors import DataError, LabelError
from ..core.metrics import classification_metrics
from ..data import Dataset, Split, load_dataset
from .ingredients import Ingredient

REFIT_PER_CLASS = 200
"""Training examples per class a refitted head sees (features through the merged body are not cached:
every candidate body needs its own, so the refit set is kept small)."""


@dataclass
class TaskData:
    """One task of a merge: its label names (the head's row order) and its splits."""

    name: str
    classes: list[str]
    source: str
    splits: dict[str, Split] = field(default_factory=dict)
    """`select` (choices), `eval` (the report), `refit` (training examples for a new head); each optional."""

    def labels(self, which: str) -> torch.Tensor:
        return torch.tensor(self.splits[which].labels)


def task_data(ing: Ingredient, data: str | Path | None, select_on: str, seed: int) -> TaskData | None:
    """The splits of `ing`'s task, or None when no data is at hand (given or recorded and still on disk)."""
    source = data if data is not None else ing.data_source
    if source is None or not Path(source).exists():
        return None
    ds = load_dataset(source, **ing.columns)
    index = {c: i for i, c in enumerate(ing.classes)}
    unknown = sorted(set(ds.classes) - set(index))
    if unknown:
        raise LabelError(f"{source}: labels the specialist {ing.folder} never saw: {', '.join(unknown[:8])}")
    task = TaskData(ing.name, ing.classes, str(source))
    if select_on in ds.splits and select_on != ds.eval_split:
        task.splits["select"] = _relabel(ds, ds.split(select_on), index)
        train = ds.split("train") if "train" in ds.splits else None
    else:  # no separate selection split: a seeded 10% of train (seen in training: optimistic, but not test)
        train, held = ds.holdout(0.1, seed)
        task.splits["select"] = _relabel(ds, held, index)
    task.splits["eval"] = _relabel(ds, ds.split(ds.eval_split), index)
    if train is not None:
        task.splits["refit"] = _relabel(ds, _per_class(train, REFIT_PER_CLASS, seed), index)
    return task


def _relabel(ds: Dataset, split: Split, index: dict[str, int]) -> Split:
    """`split` with labels as indices into the specialist's classes (its head's row order)."""
    return Split(list(split.items), [index[ds.classes[y]] for y in split.labels])


def _per_class(split: Split, per_class: int, seed: int) -> Split:
    from ..data.sampling import per_class_sample

    n = max(split.labels, default=-1) + 1
    return split.subset(sorted(per_class_sample(split.labels, n, per_class, seed)))


def logits(features: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    return features.float() @ head["head.weight"].float().T + head["head.bias"].float()


def scores(features: torch.Tensor, labels: torch.Tensor, head: dict[str, torch.Tensor], classes: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of `head` on features."""
    m = classification_metrics(logits(features, head).argmax(-1), labels, classes)
    return {"accuracy": round(float(m["accuracy"]), 4), "macro_f1": round(float(m["macro_f1"]), 4)}


def refit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """A new linear head on the merged body's features (the probe's closed-form logistic regression)."""
    from ..methods.probe.method import fit_linear_head

    if len(set(labels.tolist())) < 2:
        raise DataError("a head refit needs examples of at least two labels")
    w, b = fit_linear_head(features, labels, num_classes, l2=1e-2)
    return {"head.weight": w.float(), "head.bias": b.float()}


def refit_heads(tasks: list[TaskData], features: Callable[[list], torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A new head per task (that has refit examples) on the body as it is set now."""
    return {t.name: refit_head(features(t.splits["refit"].items), t.labels("refit"), len(t.classes))
            for t in tasks if "refit" in t.splits}


def judge(tasks: list[TaskData], heads: dict[str, dict[str, torch.Tensor]], features: Callable[[list], torch.Tensor],
          which: str, refitted: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Score the body as it is set now on every task's `which` split, with the given heads and with the
    `refitted` ones. Returns {task: {"kept": scores, "refit": scores}}."""
    out: dict[str, Any] = {}
    for task in tasks:
        if which not in task.splits:
            continue
        feats, labels = features(task.splits[which].items), task.labels(which)
        row: dict[str, Any] = {"kept": scores(feats, labels, heads[task.name], task.classes)}
        if refitted and task.name in refitted:
            row["refit"] = scores(feats, labels, refitted[task.name], task.classes)
        out[task.name] = row
    return out


def mean_accuracy(judged: dict[str, Any], choice: Callable[[dict], str] = lambda row: "kept") -> float:
    """Mean over tasks of the accuracy of each task's chosen head ("kept" or "refit")."""
    vals = [row[choice(row)]["accuracy"] for row in judged.values()]
    return sum(vals) / len(vals) if vals else float("nan")


def better_head(row: dict[str, Any]) -> str:
    """"refit" when the refitted head scores higher on this split, else "kept"."""
    return "refit" if "refit" in row and row["refit"]["accuracy"] > row["kept"]["accuracy"] else "kept"
