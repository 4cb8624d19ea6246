"""Transferability scores: how well frozen features (or a source classifier) suit a labelled dataset.

Pure numpy (float64) functions; torch tensors are accepted and converted. For every score, higher
is better. Labels may be any ints (or strings): they are remapped to 0..C-1 with np.unique.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import DataError
from ..data.sampling import stratified_subsample  # noqa: F401  (also imported from here)

SCORES = {
    "logme": "LogME: mean per-class log marginal evidence of a Bayesian linear model on the features",
    "nce": "NCE: -H(target | source label), from the source classifier's argmax labels",
    "leep": "LEEP: mean log-likelihood of the empirical source->target classifier",
    "hscore": "H-score: tr(cov(f)^-1 cov(E[f|y])), Ledoit-Wolf shrunk by default",
    "knn": "leave-one-out k-nearest-neighbour accuracy, cosine similarity",
}

_TINY = 1e-12  # guards divisions/logs whose operand is zero only when its numerator is too


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator or requiring grad
        x = x.detach().cpu()
    a = np.asarray(x)
    if a.ndim != ndim:
        raise DataError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.shape[0] < 2:
        raise DataError(f"{name} holds {a.shape[0]} example(s); a score needs at least 2")
    return a


def _features(x: Any, name: str = "features") -> np.ndarray:
    f = _array(x, name, 2).astype(np.float64)
    if not np.isfinite(f).all():
        raise DataError(f"{name} contain NaN or inf ({int((~np.isfinite(f)).sum())} values)")
    return f


def _labels(y: Any, n: int, name: str = "labels", min_classes: int = 2) -> tuple[np.ndarray, int]:
    """Labels remapped to 0..C-1, and C."""
    a = _array(y, name, 1)
    if len(a) != n:
        raise DataError(f"{name} has {len(a)} entries but there are {n} examples")
    classes, idx = np.unique(a, return_inverse=True)
    if len(classes) < min_classes:
        raise DataError(f"{name} hold {len(classes)} class(es); a score needs at least {min_classes}")
    return idx.reshape(-1), len(classes)


def logme(features: Any, labels: Any) -> float:
    """LogME (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning"): for each class c, a Bayesian linear model y_c ~ N(f w, 1/beta), w ~ N(0, I/alpha) on
    the one-hot target y_c; alpha, beta maximise the log evidence log p(y_c | f) by the paper's
    fixed-point iteration; the score is the mean over classes of evidence / N. Higher is better.

    features [N, D] (used as given, not normalised); labels [N]. Follows the SVD formulation of
    thuml/LogME `_fit_fixed_point` (11 iterations at most, tolerance 1e-3 on alpha/beta), except that
    log|A| counts the D - rank zero eigenvalues of f^T f (they contribute log alpha each): the
    reference drops them, which is wrong when N < D (thuml/LogME issue #23, fix in PR #24).

    >>> rng = np.random.default_rng(0); y = np.arange(100) % 2
    >>> logme(np.eye(2)[y] + 0.1 * rng.normal(size=(100, 2)), y) > logme(rng.normal(size=(100, 2)), y)
    True
    """
    f = _features(features)
    y, num_classes = _labels(labels, len(f))
    n, d = f.shape
    if n > d:  # SVD of the D x D Gram matrix is far cheaper than of f when N >> D
        _, s2, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s2)
        k = int((s > 1e-10).sum())  # rank of f
        s = s[:k]
        u = (f @ vh[:k].T) / s
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        k = len(s)
    if k == 0 or s[0] <= 1e-10:
        raise DataError("features are all zero: LogME needs features that vary")
    sigma = s ** 2  # the nonzero eigenvalues of f^T f; the other d - k are 0
    x_all = u.T @ np.eye(num_classes)[y]  # [k, C]: the one-hot targets in the left singular basis
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)  # = |y_c|^2
    evidences = []
    for c in range(num_classes):
        x2 = x_all[:, c] ** 2
        res_x2 = counts[c] - x2.sum()  # the part of y_c outside the span of f
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()  # |m|^2, m the posterior mean of w
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2  # |f m - y_c|^2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        log_det_a = np.log(alpha + beta * sigma).sum() + (d - k) * np.log(alpha)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det_a
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def nce(source_labels: Any, labels: Any) -> float:
    """Negative Conditional Entropy (Tran et al., ICCV 2019, "Transferability and Hardness of
    Supervised Classification Tasks"): -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z), natural log, from
    the empirical joint distribution of source labels Z [N] (e.g. a source classifier's argmax) and
    target labels Y [N]. At most 0, reached when Y is a function of Z. Higher is better.

    >>> round(nce([0, 0, 1, 1], [0, 1, 2, 2]), 4)  # Z=0 splits evenly: -(1/2) ln 2
    -0.3466
    """
    z_raw = _array(source_labels, "source_labels", 1)
    y, num_classes = _labels(labels, len(z_raw))
    z, num_source = _labels(z_raw, len(y), "source_labels", min_classes=1)
    joint = np.bincount(z * num_classes + y, minlength=num_source * num_classes).reshape(num_source, num_classes)
    joint = joint / len(y)
    p_y_given_z = joint / joint.sum(1, keepdims=True)  # every row is a seen Z, so its sum is > 0
    nz = joint > 0  # 0 log 0 = 0
    return float((joint[nz] * np.log(p_y_given_z[nz])).sum())


def leep(source_probs: Any, labels: Any) -> float:
    """LEEP (Nguyen et al., ICML 2020, "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations"). source_probs [N, Z]: the source classifier's probabilities (rows sum to 1);
    labels [N]. Empirical joint P(y, z) = mean_i source_probs[i, z] [y_i = y], conditional
    P(y | z) = P(y, z) / P(z); score = mean_i log sum_z P(y_i | z) source_probs[i, z]. At most 0.
    Higher is better. Written from the definition rather than ported from published code.

    >>> round(leep([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [5, 7, 7]), 6)  # Z predicts Y perfectly
    0.0
    """
    p = _features(source_probs, "source_probs")
    y, num_classes = _labels(labels, len(p))
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise DataError("source_probs must be probabilities: non-negative, each row summing to 1")
    joint = np.eye(num_classes)[y].T @ p / len(p)  # [C, Z]
    p_y_given_z = joint / np.maximum(joint.sum(0, keepdims=True), _TINY)  # P(z) = 0: column of 0s
    eep = (p @ p_y_given_z.T)[np.arange(len(p)), y]  # > 0: sample i itself adds to P(y_i | z)
    return float(np.log(np.maximum(eep, _TINY)).mean())


def _ledoit_wolf(fc: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrunk covariance of centred fc [N, D] and its shrinkage: the same
    estimator as sklearn.covariance.LedoitWolf: (1 - a) S + a (tr S / D) I, S = fc^T fc / N."""
    n, d = fc.shape
    cov = fc.T @ fc / n
    if d == 1:  # nothing to shrink towards
        return cov, 0.0
    mu = np.trace(cov) / d
    sq_norms = (fc ** 2).sum(1)
    beta_ = (sq_norms ** 2).sum()  # sum of the entries of (fc^2)^T (fc^2)
    delta_ = (cov ** 2).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * np.trace(cov) + d * mu ** 2) / d  # |S - mu I|_F^2 / D
    beta = min(beta, delta)  # never shrink past the target
    shrink = 0.0 if beta <= 0 else beta / delta
    shrunk = (1 - shrink) * cov
    shrunk.flat[:: d + 1] += shrink * mu
    return shrunk, float(shrink)


def hscore(features: Any, labels: Any, shrinkage: bool = True) -> float:
    """H-score (Bao et al., ICIP 2019, "An Information-Theoretic Approach to Transferability in Task
    Transfer Learning"): tr(cov(f)^+ cov(E[f | y])) on features [N, D] centred, labels [N]; the
    (1/N-normalised) covariances' scale cancels. shrinkage=True: the regularised H-score of Ibrahim,
    Ponomareva & Mazumder (ICLR 2022, "Newer is not always better"), tr(cov_a(f)^-1 (1 - a)
    cov(E[f | y])) with cov_a the Ledoit-Wolf estimate and a its shrinkage, stable when D is large
    against N; shrinkage=False: the pseudo-inverse of the sample covariance. Higher is better.

    >>> round(hscore([[0.0], [2.0], [4.0], [6.0]], [0, 0, 1, 1], shrinkage=False), 6)  # var E[f|y] / var f
    0.8
    """
    f = _features(features)
    y, num_classes = _labels(labels, len(f))
    fc = f - f.mean(0)
    class_means = np.zeros((num_classes, f.shape[1]))
    np.add.at(class_means, y, fc)
    class_means /= np.bincount(y, minlength=num_classes)[:, None]
    g = class_means[y]  # E[f | y] per sample; centred since fc is
    cov_g = g.T @ g / len(f)
    if shrinkage:
        cov_f, a = _ledoit_wolf(fc)
        cov_g = (1 - a) * cov_g
    else:
        cov_f = fc.T @ fc / len(f)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True) @ cov_g))


def knn_accuracy(features: Any, labels: Any, k: int = 5, max_samples: int = 2000, seed: int = 0) -> float:
    """Leave-one-out k-nearest-neighbour accuracy on features [N, D], labels [N]: each sample is
    classified by majority vote of its k most cosine-similar other samples (rows L2-normalised),
    ties broken by the larger summed similarity. If N > max_samples, a class-stratified subsample of
    max_samples drawn with `seed` is used. Similarities are computed in row blocks, so memory stays
    O(block * N). A fraction in [0, 1]; higher is better.

    >>> knn_accuracy(np.repeat(np.eye(3), 4, axis=0), np.repeat([0, 1, 2], 4), k=3)
    1.0
    """
    f = _features(features)
    y, num_classes = _labels(labels, len(f))
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    if len(f) > max_samples:
        keep = stratified_subsample(y, max_samples, seed)
        f, y = f[keep], y[keep]
    n = len(f)
    k = min(k, n - 1)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), _TINY)
    block = max(1, min(n, 4_000_000 // n))  # ~32 MB of float64 similarities per block
    correct = 0
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        sim = f[rows] @ f.T
        sim[np.arange(len(rows)), rows] = -np.inf  # leave the sample itself out
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn, axis=1)
        votes = np.zeros((len(rows), num_classes))
        sim_sum = np.zeros((len(rows), num_classes))
        np.add.at(votes, (np.arange(len(rows))[:, None], y[nn]), 1.0)
        np.add.at(sim_sum, (np.arange(len(rows))[:, None], y[nn]), nn_sim)
        tied = votes == votes.max(1, keepdims=True)
        pred = np.where(tied, sim_sum, -np.inf).argmax(1)
        correct += int((pred == y[rows]).sum())
    return correct / n
