"""Seeded, class-aware sampling: the one home of every protocol that picks rows by class.

Three protocols, each used wherever it applies (they differ on purpose, and each one's seeded output is
pinned by benchmarks and tests, so none is re-expressed through another):

- `per_class_sample`: up to K rows of every class (`Dataset.with_shots`, in-context demonstrations).
- `stratified_indices`: a held-out fraction of every class (probe's L2 holdout, `Dataset.holdout`, splitting a
  single table into train/test).
- `stratified_subsample`: a fixed total keeping each class's share (capping ranking and kNN workloads).
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np


def per_class_sample(labels: Sequence[int], num_classes: int, per_class: int, seed: int) -> list[int]:
    """Indices of up to `per_class` rows of each class 0..num_classes-1, sampled with `random.Random(seed)`.

    Class by class, each class's picks sorted; a class with fewer rows keeps all of them. The result depends
    only on (labels, per_class, seed), so every method given the same seed sees the same rows.

    >>> per_class_sample([0, 1, 0, 1, 1], 2, 1, seed=0)
    [2, 3]
    """
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in range(num_classes):
        idx = [i for i, y in enumerate(labels) if y == c]
        chosen += sorted(rng.sample(idx, min(per_class, len(idx))))
    return chosen


def stratified_indices(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) indices: `fraction` of each class held out, seeded; a class of one stays whole.

    >>> stratified_indices([0, 0, 0, 0, 1, 1], 0.25, seed=0)[1]  # one of each class held out
    [2, 4]
    """
    rng = random.Random(seed)
    keep, held = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        n_held = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        held += idx[:n_held]
        keep += idx[n_held:]
    return sorted(keep), sorted(held)


def stratified_subsample(y: Any, size: int, seed: int, min_per_class: int = 0) -> np.ndarray:
    """Sorted indices of `size` samples of labels `y` (0..C-1) keeping each class's share (largest-remainder
    rounding), and at least `min_per_class` of a class where it has them (then possibly a few more than `size`).

    >>> np.bincount(np.array([0] * 90 + [1] * 10)[stratified_subsample([0] * 90 + [1] * 10, 10, seed=0)])
    array([9, 1])
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    counts = np.bincount(y)
    quota = counts * size / len(y)
    take = np.minimum(counts, np.maximum(np.floor(quota).astype(int), min_per_class))
    room = [i for i in np.argsort(-(quota - np.floor(quota)), kind="stable") if take[i] < counts[i]]
    take[room[: max(0, size - int(take.sum()))]] += 1
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:t] for c, t in enumerate(take)]))
