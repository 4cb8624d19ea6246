"""Transferability scores: hand-computed values, a port of the published LogME code, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headstart.core.errors import DataError
from headstart.transfer.scores import SCORES, hscore, knn_accuracy, leep, logme, nce


# ---- reference LogME --------------------------------------------------------------------------
# A port of thuml/LogME, LogME.py (https://github.com/thuml/LogME/blob/main/LogME.py, commit
# 3a0895084badc924dce3eb049580100bf7258f42): `truncated_svd` and `LogME._fit_fixed_point` (what
# `LogME.fit` calls; `_fit = _fit_fixed_point`), and `each_evidence` + `LogME._fit_icml` (the ICML
# 2021 version), with @njit, `self` and the regression branch dropped. The maths is copied as is.
# `pad_sigma=True` applies the fix of thuml/LogME PR #24 (issue #23): log|A| must count the D - k
# zero eigenvalues of f^T f, which `_fit_fixed_point` drops; headstart's `logme` includes them.

def _ref_truncated_svd(x):
    u, s, vh = np.linalg.svd(x.transpose() @ x)
    s = np.sqrt(s)
    u_times_sigma = x @ vh.transpose()
    k = np.sum((s > 1e-10) * 1)  # rank of f
    s = s.reshape(-1, 1)
    s = s[:k]
    vh = vh[:k]
    u = u_times_sigma[:, :k] / s.reshape(1, -1)
    return u, s, vh


def _ref_fit_fixed_point(f, y, pad_sigma=False):
    """Returns (score, alphas), as `LogME.fit` and its `self.alphas`."""
    f = f.astype(np.float64)
    N, D = f.shape  # k = min(N, D)
    if N > D:  # direct SVD may be expensive
        u, s, vh = _ref_truncated_svd(f)
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    s = s.reshape(-1, 1)
    sigma = (s ** 2)
    # PR #24: the evidence's log|A| uses sigma padded with zeros to D entries
    sigma_ev = np.concatenate([sigma, np.zeros((D - len(sigma), 1))]) if pad_sigma else sigma

    evidences, alphas = [], []
    num_dim = int(y.max() + 1)
    for i in range(num_dim):
        y_ = (y == i).astype(np.float64)
        y_ = y_.reshape(-1, 1)
        x = u.T @ y_  # x has shape [k, 1], but actually x should have shape [N, 1]
        x2 = x ** 2
        res_x2 = (y_ ** 2).sum() - x2.sum()  # if k < N, we compute sum of xi for 0 singular values directly

        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (N - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            # (the published loop also computes the evidence here; it is recomputed below, so it is left out)
            if abs(t_ - t) / t <= 1e-3:  # abs(t_ - t) <= 1e-5 or abs(1 / t_ - 1 / t) <= 1e-5:
                break
        evidence = D / 2.0 * np.log(alpha) \
            + N / 2.0 * np.log(beta) \
            - 0.5 * np.sum(np.log(alpha + beta * sigma_ev)) \
            - beta / 2.0 * res2 \
            - alpha / 2.0 * m2 \
            - N / 2.0 * np.log(2 * np.pi)
        evidence /= N
        evidences.append(evidence)
        alphas.append(alpha)
    return np.mean(evidences), np.array(alphas)


def _ref_each_evidence(y_, f, fh, v, s, vh, N, D):
    epsilon = 1e-5
    alpha = 1.0
    beta = 1.0
    lam = alpha / beta
    tmp = (vh @ (f @ np.ascontiguousarray(y_)))
    for _ in range(11):
        # should converge after at most 10 steps
        # typically converge after two or three steps
        gamma = (s / (s + lam)).sum()
        m = v @ (tmp * beta / (alpha + beta * s))
        alpha_de = (m * m).sum()
        alpha = gamma / (alpha_de + epsilon)
        beta_de = ((y_ - fh @ m) ** 2).sum()
        beta = (N - gamma) / (beta_de + epsilon)
        new_lam = alpha / beta
        if np.abs(new_lam - lam) / lam < 0.01:
            break
        lam = new_lam
    evidence = D / 2.0 * np.log(alpha) \
        + N / 2.0 * np.log(beta) \
        - 0.5 * np.sum(np.log(alpha + beta * s)) \
        - beta / 2.0 * (beta_de + epsilon) \
        - alpha / 2.0 * (alpha_de + epsilon) \
        - N / 2.0 * np.log(2 * np.pi)
    return evidence / N


def _ref_fit_icml(f, y):
    f = f.astype(np.float64)
    fh = f
    f = f.transpose()
    D, N = f.shape
    v, s, vh = np.linalg.svd(f @ fh, full_matrices=True)
    evidences = []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64)
        evidences.append(_ref_each_evidence(y_, f, fh, v, s, vh, N, D))
    return np.mean(evidences)


# ---- LogME ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,classes", [(200, 16, 4), (30, 64, 3)])
def test_logme_matches_reference_port(n, d, classes):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d)) + 0.5 * np.eye(classes, d)[np.arange(n) % classes]
    y = np.arange(n) % classes
    rng.shuffle(y)  # features only weakly tied to the labels now: a non-trivial evidence
    ours = logme(f, y)
    ref_fixed, alphas = _ref_fit_fixed_point(f, y, pad_sigma=True)
    assert ours == pytest.approx(ref_fixed, rel=1e-6)
    unpatched, _ = _ref_fit_fixed_point(f, y)
    k = min(n, d)
    # the published code differs from ours by exactly the dropped (D - k) log(alpha) / 2 per class
    assert unpatched - ours == pytest.approx(np.mean((d - k) / 2 * np.log(alphas)) / n, rel=1e-6, abs=1e-12)
    if n > d:
        assert ours == pytest.approx(unpatched, rel=1e-6)
    # the ICML-2021 routine stops on a looser criterion (1% on alpha/beta) but has the same optimum
    assert ours == pytest.approx(_ref_fit_icml(f, y), rel=2e-3)


def test_logme_arbitrary_labels_and_torch_input():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(60, 5))
    y = np.arange(60) % 3
    expected = logme(f, y)
    assert logme(torch.tensor(f, dtype=torch.float64), torch.tensor(y * 7 - 100)) == pytest.approx(expected)


def test_logme_prefers_separable_features():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    separable = 3.0 * np.eye(3, 10)[y] + rng.normal(size=(300, 10))
    random = rng.normal(size=(300, 10))
    assert logme(separable, y) > logme(random, y) + 0.1


# ---- NCE ----------------------------------------------------------------------------------------

def test_nce_hand_computed():
    z = [0, 0, 0, 0, 1, 1]
    y = [0, 0, 1, 1, 1, 1]
    # P(z=0) = 4/6 with P(y|z=0) = (1/2, 1/2): H = ln 2; P(z=1) = 2/6 with P(y|z=1) = (0, 1): H = 0
    # H(Y|Z) = 4/6 ln 2 + 2/6 * 0
    assert nce(z, y) == pytest.approx(-(4 / 6) * math.log(2))
    z = [3, 3, 3, 9, 9]
    y = [0, 0, 1, 0, 1]
    # P(z=3) = 3/5, P(y|z=3) = (2/3, 1/3); P(z=9) = 2/5, P(y|z=9) = (1/2, 1/2)
    h = 3 / 5 * -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) + 2 / 5 * math.log(2)
    assert nce(z, y) == pytest.approx(-h)


def test_nce_zero_when_target_is_a_function_of_source():
    z = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    y = z % 2  # many source classes per target class, but no ambiguity
    assert nce(z, y) == pytest.approx(0.0, abs=1e-12)
    assert nce(z, np.array([0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1])) < -0.1


# ---- LEEP ---------------------------------------------------------------------------------------

def test_leep_hand_computed():
    p = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    y = [0, 0, 1, 1]
    # joint P(y, z) = (1/4) * [[0.8 + 0.6, 0.2 + 0.4], [0.3 + 0.1, 0.7 + 0.9]] = [[1.4, 0.6], [0.4, 1.6]] / 4
    # P(z) = [1.8, 2.2] / 4, so P(y|z=0) = (1.4/1.8, 0.4/1.8) = (7/9, 2/9), P(y|z=1) = (0.6/2.2, 1.6/2.2) = (3/11, 8/11)
    eep = [0.8 * 7 / 9 + 0.2 * 3 / 11,  # sample 0, y = 0
           0.6 * 7 / 9 + 0.4 * 3 / 11,  # sample 1, y = 0
           0.3 * 2 / 9 + 0.7 * 8 / 11,  # sample 2, y = 1
           0.1 * 2 / 9 + 0.9 * 8 / 11]  # sample 3, y = 1
    assert leep(p, y) == pytest.approx(np.mean(np.log(eep)))


def test_leep_perfect_one_hot_source_equals_mean_log_true_class_prob():
    y = np.array([0, 1, 2, 0, 1, 2, 2])
    p = np.eye(3)[y]
    # source classes = target classes: P(y|z) = I, so LEEP = mean_i log p[i, y_i] = log 1 = 0
    assert leep(p, y) == pytest.approx(np.mean(np.log(p[np.arange(len(y)), y])), abs=1e-12)
    assert leep(p, y) == pytest.approx(0.0, abs=1e-12)
    # renamed target classes change nothing; an unused source class (P(z) = 0) is harmless
    p4 = np.hstack([p, np.zeros((len(y), 1))])
    assert leep(p4, (y + 1) % 3 * 10) == pytest.approx(0.0, abs=1e-12)
    assert leep(np.full((7, 3), 1 / 3), y) == pytest.approx(np.mean(np.log(np.bincount(y)[y] / 7)))


# ---- H-score ------------------------------------------------------------------------------------

def test_hscore_hand_computed_1d():
    f = [[0.0], [2.0], [4.0], [6.0]]
    y = [0, 0, 1, 1]
    # centred f = [-3, -1, 1, 3]: var f = (9 + 1 + 1 + 9) / 4 = 5; E[f|y] = [-2, -2, 2, 2]: var = 4
    assert hscore(f, y, shrinkage=False) == pytest.approx(4 / 5)
    assert hscore(f, y) == pytest.approx(4 / 5)  # one feature: Ledoit-Wolf does not shrink


def test_hscore_higher_for_separated_classes():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    f = 2.0 * np.eye(4, 12)[y] + rng.normal(size=(200, 12))
    shuffled = rng.permutation(y)
    for shrink in (True, False):
        assert hscore(f, y, shrinkage=shrink) > hscore(f, shuffled, shrinkage=shrink) + 0.5


def test_hscore_shrinkage_matches_sklearn_ledoit_wolf():
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(2)
    y = np.arange(40) % 3
    f = rng.normal(size=(40, 25)) + np.eye(3, 25)[y]  # D close to N: shrinkage matters
    fc = f - f.mean(0)
    lw = covariance.LedoitWolf(assume_centered=False).fit(fc)
    g = np.stack([fc[y == c].mean(0) for c in range(3)])[y]
    expected = np.trace(np.linalg.pinv(lw.covariance_) @ ((1 - lw.shrinkage_) * g.T @ g / len(f)))
    assert 0 < lw.shrinkage_ < 1
    assert hscore(f, y) == pytest.approx(expected, rel=1e-8)


# ---- kNN ----------------------------------------------------------------------------------------

def test_knn_separated_clusters_and_chance():
    rng = np.random.default_rng(0)
    y = np.arange(150) % 3
    clusters = 10.0 * np.eye(3, 8)[y] + 0.5 * rng.normal(size=(150, 8))
    assert knn_accuracy(clusters, y) == 1.0
    random_labels = rng.integers(0, 3, size=600)
    acc = knn_accuracy(rng.normal(size=(600, 16)), random_labels)
    assert 0.2 < acc < 0.5  # chance is 1/3


def test_knn_ties_broken_by_summed_similarity():
    # unit vectors at angles 0, 10, -20 and 180 degrees; k = 2 gives a 1-1 vote for samples 0, 1, 3.
    # 0: {10deg class 0, -20deg class 1} -> class 0 is closer: right. 1: {0deg, -20deg} -> 0: right.
    # 2: {0deg, 10deg} both class 0: wrong. 3: {-20deg class 1, 10deg class 0} -> 1 (-0.94 > -0.98): right.
    angles = np.radians([0.0, 10.0, -20.0, 180.0])
    f = np.stack([np.cos(angles), np.sin(angles)], 1)
    assert knn_accuracy(f, [0, 0, 1, 1], k=2) == pytest.approx(0.75)
    assert knn_accuracy(5 * f, [0, 0, 1, 1], k=2) == pytest.approx(0.75)  # cosine: scale-free


def test_knn_subsample_is_seeded_and_blocks_agree():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=900)
    f = 1.5 * np.eye(4, 6)[y] + rng.normal(size=(900, 6))
    a = knn_accuracy(f, y, max_samples=300, seed=1)
    assert a == knn_accuracy(f, y, max_samples=300, seed=1)
    assert a != knn_accuracy(f, y, max_samples=300, seed=2)
    full = knn_accuracy(f, y)  # N <= max_samples: the seed is irrelevant
    assert full == knn_accuracy(f, y, seed=5)
    assert abs(a - full) < 0.1


def test_stratified_subsample_keeps_class_shares():
    from headstart.transfer.scores import stratified_subsample

    y = np.repeat([0, 1, 2], [500, 300, 200])
    idx = stratified_subsample(y, 101, seed=0)
    assert len(idx) == 101 and len(set(idx.tolist())) == 101
    assert np.bincount(y[idx]).tolist() == [51, 30, 20]  # 50.5 -> 51 by largest remainder


# ---- validation ---------------------------------------------------------------------------------

def test_scores_table():
    assert set(SCORES) == {"logme", "nce", "leep", "hscore", "knn"}


@pytest.mark.parametrize("fn", [logme, hscore, knn_accuracy])
def test_feature_scores_reject_bad_input(fn):
    f = np.random.default_rng(0).normal(size=(6, 3))
    y = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(DataError, match="5 entries but there are 6"):
        fn(f, y[:5])
    with pytest.raises(DataError, match="1 class"):
        fn(f, np.zeros(6, dtype=int))
    with pytest.raises(DataError, match="at least 2"):
        fn(f[:1], y[:1])
    for bad in (np.nan, np.inf):
        g = f.copy()
        g[2, 1] = bad
        with pytest.raises(DataError, match="NaN or inf"):
            fn(g, y)
    with pytest.raises(DataError, match="2-D"):
        fn(f[:, 0], y)


def test_label_scores_reject_bad_input():
    with pytest.raises(DataError, match="3 entries but there are 4"):
        nce([0, 1, 0, 1], [0, 1, 1])
    with pytest.raises(DataError, match="1 class"):
        nce([0, 1, 0, 1], [2, 2, 2, 2])
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(DataError, match="2 entries but there are 3"):
        leep(p, [0, 1])
    with pytest.raises(DataError, match="probabilities"):
        leep(p * 2, [0, 1, 1])
    with pytest.raises(DataError, match="NaN or inf"):
        leep(np.array([[np.nan, 1.0], [0.9, 0.1], [0.2, 0.8]]), [0, 1, 1])
