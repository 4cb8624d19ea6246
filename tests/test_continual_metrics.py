"""bench/continual_metrics.py: ACC, BWT, forgetting (GEM / Chaudhry et al. definitions) on hand-made matrices."""
from __future__ import annotations

import math

import pytest
from conftest import load_bench_module

cm = load_bench_module("continual_metrics")

# Class-incremental, 3 nights: night 0 is forgotten progressively, night 1 a little.
CLASS_R = [[0.90, None, None],
           [0.70, 0.80, None],
           [0.60, 0.75, 0.95]]
# Domain-incremental: every entry measured; night 0 peaks after night 1 (positive transfer first).
DOMAIN_R = [[0.80, 0.70, 0.60],
            [0.85, 0.90, 0.70],
            [0.82, 0.88, 0.92]]


def test_acc_is_the_mean_of_the_last_row():
    assert cm.acc(CLASS_R) == pytest.approx((0.60 + 0.75 + 0.95) / 3)
    assert cm.acc(DOMAIN_R) == pytest.approx((0.82 + 0.88 + 0.92) / 3)


def test_bwt_compares_the_last_row_with_the_diagonal():
    assert cm.bwt(CLASS_R) == pytest.approx(((0.60 - 0.90) + (0.75 - 0.80)) / 2)
    assert cm.bwt(DOMAIN_R) == pytest.approx(((0.82 - 0.80) + (0.88 - 0.90)) / 2)  # = 0: gains cancel losses


def test_forgetting_uses_the_best_earlier_accuracy_not_the_diagonal():
    assert cm.forgetting_per_night(CLASS_R) == pytest.approx([0.30, 0.05])
    # night 0 peaked at 0.85 after night 1: forgetting is 0.85 - 0.82, not 0.80 - 0.82 (negative)
    assert cm.forgetting_per_night(DOMAIN_R) == pytest.approx([0.03, 0.02])
    assert cm.max_forgetting(CLASS_R) == pytest.approx(0.30)
    assert cm.mean_forgetting(CLASS_R) == pytest.approx(0.175)
    assert cm.max_forgetting(DOMAIN_R) == pytest.approx(0.03)


def test_no_forgetting_and_a_single_night():
    perfect = [[1.0, None], [1.0, 1.0]]
    assert cm.bwt(perfect) == 0 and cm.max_forgetting(perfect) == 0 and cm.acc(perfect) == 1.0
    one = [[0.7]]
    assert cm.acc(one) == pytest.approx(0.7)
    assert cm.bwt(one) == 0.0 and cm.max_forgetting(one) == 0.0 and cm.mean_forgetting(one) == 0.0


def test_improving_old_nights_gives_positive_bwt_and_negative_forgetting():
    R = [[0.5, None], [0.9, 0.8]]
    assert cm.bwt(R) == pytest.approx(0.4)
    assert cm.max_forgetting(R) == pytest.approx(-0.4)


def test_seen_accuracy_weights_nights_by_their_test_size():
    seen = cm.seen_accuracy(CLASS_R, [100, 50, 50])
    assert seen[0] == pytest.approx(0.90)
    assert seen[1] == pytest.approx((0.70 * 100 + 0.80 * 50) / 150)
    assert seen[2] == pytest.approx((0.60 * 100 + 0.75 * 50 + 0.95 * 50) / 200)
    with pytest.raises(ValueError, match="test size"):
        cm.seen_accuracy(CLASS_R, [100, 50])


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([[0.9, None], [0.8]], "square"),
    ([[0.9, None], [None, 0.8]], r"R\[1\]\[0\]"),
    ([[0.9, None], [math.nan, 0.8]], r"R\[1\]\[0\]"),
])
def test_malformed_matrices_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        cm.acc(bad)


def test_summarise_and_aggregate_over_seeds():
    s0 = cm.summarise(CLASS_R, [100, 50, 50])
    s1 = cm.summarise([[0.80, None, None], [0.70, 0.90, None], [0.70, 0.85, 0.90]], [100, 50, 50])
    assert s0["diagonal"] == [0.90, 0.80, 0.95]
    agg = cm.aggregate([s0, s1])
    assert agg["acc"]["mean"] == pytest.approx(round((s0["acc"] + s1["acc"]) / 2, 4))
    assert agg["acc"]["n"] == 2
    assert agg["acc"]["std"] == pytest.approx(abs(s0["acc"] - s1["acc"]) / math.sqrt(2), abs=1e-4)
    assert agg["max_forgetting"]["mean"] == pytest.approx(round((0.30 + 0.10) / 2, 4))
    assert agg["diagonal"] == pytest.approx([0.85, 0.85, 0.925])


def test_mean_std_and_mean_matrix():
    assert cm.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert cm.mean_std([0.5, 0.7])["std"] == pytest.approx(0.1414, abs=1e-4)
    with pytest.raises(ValueError):
        cm.mean_std([])
    mean = cm.mean_matrix([[[1.0, None], [0.5, 1.0]], [[0.5, None], [0.5, 0.0]]])
    assert mean == [[0.75, None], [0.5, 0.5]]
    with pytest.raises(ValueError, match="shapes"):
        cm.mean_matrix([[[1.0]], [[1.0, None], [0.5, 1.0]]])


def test_loss_summary_counts_a_loss_rise_as_forgetting():
    L = [[1.50, 2.00, 2.10],
         [1.40, 1.20, 2.00],   # night 0's loss improved to 1.40 after night 1: its best
         [1.70, 1.25, 1.10]]
    s = cm.loss_summary(L)
    assert s["final_loss"] == pytest.approx((1.70 + 1.25 + 1.10) / 3)
    assert s["loss_rise_per_night"] == pytest.approx([0.30, 0.05])
    assert s["max_loss_rise"] == pytest.approx(0.30)
    assert s["bwt_loss"] == pytest.approx(((1.70 - 1.50) + (1.25 - 1.20)) / 2)
    assert s["diagonal"] == [1.50, 1.20, 1.10]


# ---- the stream builders' pure pieces (bench/continual_streams.py) ------------------------------

streams = load_bench_module("continual_streams")


def test_class_groups_cover_every_class_once_in_near_equal_seeded_groups():
    classes = [f"intent{i:02d}" for i in range(77)]
    groups = streams.class_groups(classes, 5, seed=0)
    assert [len(g) for g in groups] == [16, 16, 15, 15, 15]
    assert sorted(c for g in groups for c in g) == sorted(classes)
    assert groups == streams.class_groups(list(reversed(classes)), 5, seed=0)  # input order does not matter
    assert groups != streams.class_groups(classes, 5, seed=1)


def test_trec_rows_become_alpaca_instructions():
    rows = streams.trec_instructions([("How far is it from Denver to Aspen ?", "NUM")])
    assert rows[0]["input"] == "How far is it from Denver to Aspen ?"
    assert rows[0]["output"] == "number"
    assert "number" in rows[0]["instruction"]
