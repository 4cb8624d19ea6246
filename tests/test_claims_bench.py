"""bench/claims.py: the FLOP count it trusts, its time-to-accuracy arithmetic, and its per-epoch test curve,
which reaches the engine through `FitContext.hooks` (tiny random base)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import headstart
from conftest import load_bench_module

claims = load_bench_module("claims")


def _forward_and_backward(conv: nn.Conv2d, counter: FlopCounterMode) -> tuple[int, int]:
    x = torch.randn(2, conv.in_channels, 10, 10, requires_grad=True)
    with counter:
        y = conv(x)
    forward = counter.get_total_flops()
    with counter:  # counts from zero again
        y.sum().backward()
    return forward, counter.get_total_flops()


@pytest.mark.parametrize("groups", [1, 8])
def test_conv_backward_costs_two_forwards(groups):
    """Input gradient + weight gradient = twice the forward, for dense and depthwise convolutions alike."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    forward, backward = _forward_and_backward(conv, claims.flop_counter())
    assert forward == 2 * 2 * (8 // groups) * 8 * 9 * 10 * 10  # 2 FLOPs per multiply-add, batch 2
    assert backward == 2 * forward
    if groups == 1:  # where torch's own formula is right, the two agree
        assert _forward_and_backward(conv, FlopCounterMode(display=False))[1] == backward


def test_reach_counts_time_and_flops_up_to_the_first_epoch_at_the_target():
    curve = {"epoch_flops": 10, "curve": [{"epoch_s": 2.0, "test_accuracy": 0.5},
                                          {"epoch_s": 3.0, "test_accuracy": 0.8},
                                          {"epoch_s": 4.0, "test_accuracy": 0.9}]}
    assert claims.reach(curve, 0.8) == {"accuracy": 0.8, "epochs": 2, "train_s": 5.0, "flops": 20}
    assert claims.reach(curve, 0.95) is None


def test_trained_curve_scores_the_test_split_after_every_epoch(tiny_text_csv):
    data = headstart.load_dataset(tiny_text_csv)
    run = claims.trained_curve(data, "tiny-text", "scratch", epochs=2)
    assert [p["epoch"] for p in run["curve"]] == [1, 2]
    assert all(0.0 <= p["test_accuracy"] <= 1.0 and p["epoch_s"] >= 0 for p in run["curve"])
    assert run["epoch_flops"] > 0 and run["batch_size"] == 32
