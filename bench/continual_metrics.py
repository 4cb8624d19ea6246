"""Continual-learning metrics on an accuracy matrix: pure functions, no torch, no headstart.

R[i][j] is the accuracy (a fraction in [0, 1]) after night i on night j's test set; nights count
from 0 here, T = len(R) - 1 is the last one. In a class-incremental stream night j's classes are
unknown before night j, so R[i][j] for j > i is None (never measured); domain-incremental streams
fill the whole matrix (forward transfer is visible above the diagonal, unused by the metrics).

Definitions (the same as GEM and Avalanche):
- ACC = mean_j R[T][j]                                     (Lopez-Paz & Ranzato 2017, GEM, eq. 2)
- BWT = mean_{j<T} (R[T][j] - R[j][j])                     (GEM, eq. 3; Avalanche `StreamBWT`)
- forgetting of night j = max_{i<T} R[i][j] - R[T][j]      (Chaudhry et al. 2018, RWalk, eq. 5; Avalanche's
  `ExperienceForgetting` uses R[j][j] instead of the max, i.e. -BWT's term: both are reported)
- max forgetting = max_{j<T} forgetting of night j; mean forgetting = their mean (Chaudhry's F_T).

>>> R = [[0.9, None], [0.7, 0.8]]
>>> s = summarise(R)
>>> round(s["acc"], 3), round(s["bwt"], 3), round(s["max_forgetting"], 3)
(0.75, -0.2, 0.2)
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

Matrix = Sequence[Sequence["float | None"]]


def _check(R: Matrix) -> int:
    """The last night's index T; a ValueError unless R is square with a measured lower triangle."""
    if not R:
        raise ValueError("the accuracy matrix is empty")
    n = len(R)
    for i, row in enumerate(R):
        if len(row) != n:
            raise ValueError(f"the accuracy matrix must be square: row {i} has {len(row)} entries, expected {n}")
        for j in range(i + 1):
            if row[j] is None or not math.isfinite(row[j]):
                raise ValueError(f"R[{i}][{j}] (after night {i}, on night {j}) must be measured, got {row[j]!r}")
    return n - 1


def acc(R: Matrix) -> float:
    """Final average accuracy: mean_j R[T][j] (GEM's ACC).

    >>> acc([[1.0, None], [0.5, 0.7]])
    0.6
    """
    T = _check(R)
    return sum(R[T][j] for j in range(T + 1)) / (T + 1)


def bwt(R: Matrix) -> float:
    """Backward transfer: mean_{j<T} (R[T][j] - R[j][j]); negative = forgetting (GEM's BWT). 0 for one night.

    >>> round(bwt([[0.9, None, None], [0.8, 0.9, None], [0.6, 0.8, 0.9]]), 3)
    -0.2
    """
    T = _check(R)
    if T == 0:
        return 0.0
    return sum(R[T][j] - R[j][j] for j in range(T)) / T


def forgetting_per_night(R: Matrix) -> list[float]:
    """Forgetting of each earlier night j < T: the best accuracy it ever had before the last night
    (max_{j<=i<T} R[i][j]) minus its final accuracy R[T][j] (Chaudhry et al. 2018). Entries above the
    diagonal are skipped when unmeasured; a domain stream's R[i][j], i < j, counts too (it was measured)."""
    T = _check(R)
    return [max(R[i][j] for i in range(T) if R[i][j] is not None) - R[T][j] for j in range(T)]


def max_forgetting(R: Matrix) -> float:
    """max_{j<T} (max_{i<T} R[i][j] - R[T][j]); 0 for a single night.

    >>> round(max_forgetting([[0.9, None, None], [0.5, 0.8, None], [0.6, 0.7, 0.9]]), 3)
    0.3
    """
    per_night = forgetting_per_night(R)
    return max(per_night) if per_night else 0.0


def mean_forgetting(R: Matrix) -> float:
    """Chaudhry et al.'s average forgetting F_T: the mean of `forgetting_per_night`; 0 for a single night."""
    per_night = forgetting_per_night(R)
    return sum(per_night) / len(per_night) if per_night else 0.0


def seen_accuracy(R: Matrix, test_sizes: Sequence[int]) -> list[float]:
    """Accuracy after night i on all the test rows seen so far (nights 0..i), for each i.

    Night test sets are disjoint (class-incremental: disjoint classes), so the accuracy on their union
    is the size-weighted mean of R[i][0..i]: no second evaluation is needed.

    >>> seen_accuracy([[1.0, None], [0.5, 1.0]], [10, 30])
    [1.0, 0.875]
    """
    T = _check(R)
    if len(test_sizes) != T + 1 or any(n <= 0 for n in test_sizes):
        raise ValueError(f"need one positive test size per night ({T + 1}), got {list(test_sizes)}")
    out = []
    for i in range(T + 1):
        total = sum(test_sizes[: i + 1])
        out.append(sum(R[i][j] * test_sizes[j] for j in range(i + 1)) / total)
    return out


def summarise(R: Matrix, test_sizes: Sequence[int] | None = None) -> dict:
    """Every metric of one run's matrix, as fractions (multiply by 100 for points)."""
    out = {"acc": acc(R), "bwt": bwt(R), "max_forgetting": max_forgetting(R), "mean_forgetting": mean_forgetting(R),
           "forgetting_per_night": forgetting_per_night(R), "diagonal": [R[i][i] for i in range(len(R))]}
    if test_sizes is not None:
        out["seen_accuracy"] = seen_accuracy(R, test_sizes)
    return out


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std", "n"} over seeds; std is the sample standard deviation (0.0 for one seed).

    >>> mean_std([0.5, 0.7])
    {'mean': 0.6, 'std': 0.1414, 'n': 2}
    """
    if not values:
        raise ValueError("no values to average")
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4), "n": len(values)}


def mean_matrix(matrices: Sequence[Matrix]) -> list[list[float | None]]:
    """Element-wise mean of same-shaped matrices over seeds (None stays None)."""
    if not matrices:
        raise ValueError("no matrices to average")
    n = len(matrices[0])
    if any(len(m) != n or any(len(row) != n for row in m) for m in matrices):
        raise ValueError("matrices of different shapes cannot be averaged")
    return [[None if matrices[0][i][j] is None else statistics.fmean(m[i][j] for m in matrices)
             for j in range(n)] for i in range(n)]


def aggregate(summaries: Sequence[dict]) -> dict:
    """mean/std over seeds of each scalar metric of `summarise` (lists are averaged element-wise)."""
    if not summaries:
        raise ValueError("no runs to aggregate")
    out = {}
    for key, first in summaries[0].items():
        if isinstance(first, (int, float)):
            out[key] = mean_std([s[key] for s in summaries])
        elif isinstance(first, list) and all(isinstance(v, (int, float)) for v in first):
            out[key] = [round(statistics.fmean(s[key][k] for s in summaries), 4) for k in range(len(first))]
    return out


def loss_summary(L: Matrix) -> dict:
    """The generative stream's metrics on a held-out LOSS matrix L[i][j] (lower is better), as PEFT measures
    forgetting: final mean loss, the rise of each earlier night's loss from its best (lowest) value before
    the last night, its max, and the mean change from the diagonal (BWT in loss units: > 0 = forgetting).

    >>> s = loss_summary([[1.5, 2.0], [1.7, 1.2]])
    >>> round(s["final_loss"], 3), round(s["max_loss_rise"], 3), round(s["bwt_loss"], 3)
    (1.45, 0.2, 0.2)
    """
    negated = [[None if v is None else -v for v in row] for row in L]
    return {"final_loss": -acc(negated), "bwt_loss": -bwt(negated), "max_loss_rise": max_forgetting(negated),
            "loss_rise_per_night": forgetting_per_night(negated), "diagonal": [L[i][i] for i in range(len(L))]}
