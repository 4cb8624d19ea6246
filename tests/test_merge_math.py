"""combine/merge_math.py on random tensors, checked against PEFT's `peft.utils.merge_utils` on the same inputs
(<= 1e-6 where the definitions coincide; the one place they differ, TIES' sign election on weighted vs
unweighted task vectors, has its own test)."""
from __future__ import annotations

import pytest
import torch

from headstart.combine import merge_math as mm
from headstart.core.errors import ConfigError, HeadstartError

pm = pytest.importorskip("peft.utils.merge_utils")
TOL = 1e-6


def _tvs(n: int = 3, shape=(7, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOL


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, headstart.combine.merge_math; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [1.0, -0.5, 2.0]])
def test_linear_and_task_arithmetic_match_peft(weights):
    tvs = _tvs()
    peft = pm.task_arithmetic(tvs, torch.tensor(weights))
    assert _close(mm.linear(tvs, weights), peft)
    assert _close(mm.task_arithmetic(tvs, weights), peft)
    assert _close(mm.merge_tensors("linear", tvs, weights), peft)
    assert _close(mm.linear(tvs, weights), sum(w * t for w, t in zip(weights, tvs)))


def test_uniform_soup_is_the_mean():
    tvs = _tvs(4)
    assert _close(mm.linear(tvs, [0.25] * 4), torch.stack(tvs).mean(0))


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_magnitude_prune_matches_peft(density):
    tv = _tvs(1, (11, 13))[0]
    ours = mm.magnitude_prune(tv, density)
    with pytest.warns(UserWarning) if density >= 1 else _nothing():
        theirs = pm.prune(tv, density, method="magnitude")
    assert _close(ours, theirs)
    assert int((ours != 0).sum()) == int(density * tv.numel())
    kept = ours[ours != 0].abs()
    if 0 < len(kept) < tv.numel():  # every kept entry outweighs every dropped one
        assert kept.min() >= tv[ours == 0].abs().max()


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_magnitude_method_matches_peft():
    tvs, w = _tvs(), [0.7, 0.2, 0.4]
    assert _close(mm.merge_tensors("magnitude", tvs, w, density=0.4), pm.magnitude_prune(tvs, torch.tensor(w), 0.4))


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_elect_sign_matches_peft_mask(method):
    tvs = [mm.magnitude_prune(t, 0.5) for t in _tvs(4, (9, 9), seed=3)]
    sign = mm.elect_sign(tvs, method)
    assert set(sign.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(torch.stack(tvs).sign() == sign, pm.calculate_majority_sign_mask(torch.stack(tvs), method))


def test_elect_sign_tie_and_zeros_give_plus():
    assert mm.elect_sign([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])]).tolist() == [1.0, 1.0]
    assert mm.elect_sign([torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([-1.0])], "frequency").tolist() == [-1.0]
    assert mm.elect_sign([torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([-1.0])], "total").tolist() == [1.0]


def test_disjoint_merge_means_agreeing_nonzero_entries():
    tvs = [torch.tensor([1.0, 0.0, -2.0, 0.0]), torch.tensor([3.0, 4.0, 5.0, 0.0]), torch.tensor([-9.0, 0.0, -4.0, 0.0])]
    sign = torch.tensor([1.0, 1.0, -1.0, 1.0])
    assert mm.disjoint_merge(tvs, sign).tolist() == [2.0, 4.0, -3.0, 0.0]
    assert _close(mm.disjoint_merge(tvs, sign), pm.disjoint_merge(torch.stack(tvs), torch.stack(tvs).sign() == sign))


@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("w", [1.0, 0.25])
def test_ties_matches_peft_with_equal_weights(majority, w):
    tvs = _tvs(4, (8, 6), seed=1)
    ours = mm.ties(tvs, [w] * 4, 0.5, majority)
    assert _close(ours, pm.ties(tvs, torch.tensor([w] * 4), 0.5, majority))
    assert _close(mm.merge_tensors("ties", tvs, [w] * 4, density=0.5, majority=majority), ours)


def test_ties_frequency_matches_peft_with_unequal_positive_weights():
    tvs, w = _tvs(3, seed=2), [0.9, 0.1, 0.5]
    assert _close(mm.ties(tvs, w, 0.6, "frequency"), pm.ties(tvs, torch.tensor(w), 0.6, "frequency"))


def test_ties_elects_on_weighted_vectors_where_peft_elects_on_unweighted():
    # Deliberate difference. Entry: task 0 says +1 with weight 0.1, task 1 says -0.5 with weight 1.0.
    # PEFT votes on unweighted values: 1 + (-0.5) > 0 -> "+", keeps task 0 only -> 0.1 * 1 = 0.1.
    # We vote on weighted values: 0.1 - 0.5 < 0 -> "-", keep task 1 only -> -0.5: the heavier task wins.
    tvs, w = [torch.tensor([1.0]), torch.tensor([-0.5])], [0.1, 1.0]
    assert _close(pm.ties(tvs, torch.tensor(w), 1.0), torch.tensor([0.1]))
    assert _close(mm.ties(tvs, w, 1.0), torch.tensor([-0.5]))
    # a negated task (weight -1) votes with its flipped sign: both now push "-", so they average to -1.5
    tvs = [torch.tensor([-1.0]), torch.tensor([2.0])]
    assert _close(mm.ties(tvs, [1.0, -1.0], 1.0), torch.tensor([-1.5]))


def test_ties_follows_the_paper_by_hand():
    tvs = [torch.tensor([0.9, -0.1, 0.4, -0.8]), torch.tensor([-0.5, 0.7, 0.3, 0.05]), torch.tensor([0.6, 0.2, -0.9, -0.3])]
    # trim to top 50%: [0.9,0,0,-0.8], [-0.5,0.7,0,0], [0.6,0,-0.9,0]
    # elect (sum): [1.0 -> +, 0.7 -> +, -0.9 -> -, -0.8 -> -]; disjoint means: [0.75, 0.7, -0.9, -0.8]
    assert _close(mm.ties(tvs, [1.0, 1.0, 1.0], 0.5), torch.tensor([0.75, 0.7, -0.9, -0.8]))


def _same_draws(fn_ours, fn_peft, seed=7):
    g = torch.Generator().manual_seed(seed)
    ours = fn_ours(g)
    torch.manual_seed(seed)  # PEFT draws from the global RNG: same seed, same stream, same masks
    return ours, fn_peft()


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_linear_matches_peft_on_the_same_random_stream(density):
    tvs, w = _tvs(3, (20, 10)), [0.5, 1.0, -0.3]
    ours, theirs = _same_draws(lambda g: mm.dare_linear(tvs, w, density, g),
                               lambda: pm.dare_linear(tvs, torch.tensor(w), density))
    assert _close(ours, theirs)


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_dare_ties_matches_peft_with_equal_weights(majority):
    tvs = _tvs(3, (20, 10), seed=4)
    ours, theirs = _same_draws(lambda g: mm.dare_ties(tvs, [1.0] * 3, 0.5, g, majority),
                               lambda: pm.dare_ties(tvs, torch.tensor([1.0] * 3), 0.5, majority))
    assert _close(ours, theirs)


def test_dare_drop_keeps_density_share_and_expectation():
    tv = torch.ones(200, 200)
    dropped = mm.dare_drop(tv, 0.25, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 4.0))
    assert abs(dropped.mean().item() - 1.0) < 0.05
    assert mm.dare_drop(tv, 1.0) is tv


def test_dare_is_reproducible_with_a_seeded_generator():
    tvs = _tvs()
    a = mm.merge_tensors("dare_ties", tvs, [1, 1, 1], density=0.5, generator=torch.Generator().manual_seed(3))
    b = mm.merge_tensors("dare_ties", tvs, [1, 1, 1], density=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", mm.METHODS)
def test_one_task_vector_with_weight_one_comes_back(method):
    tv = _tvs(1, (6, 4))[0]
    assert _close(mm.merge_tensors(method, [tv], [1.0], generator=torch.Generator().manual_seed(0)), tv)


@pytest.mark.parametrize("method", mm.METHODS)
def test_identical_task_vectors_merge_to_themselves_under_mean_weights(method):
    tv = _tvs(1, (5, 5))[0]
    weights = [1.0] * 3 if method in ("ties", "dare_ties") else [1 / 3] * 3
    assert _close(mm.merge_tensors(method, [tv, tv, tv], weights), tv)


def test_refusals_are_one_line_config_errors():
    tvs = _tvs(2)
    cases = [
        lambda: mm.merge_tensors("avg", tvs, [1, 1]),
        lambda: mm.merge_tensors("linear", tvs, [1.0]),
        lambda: mm.merge_tensors("linear", [], []),
        lambda: mm.merge_tensors("linear", [tvs[0], torch.zeros(2)], [1, 1]),
        lambda: mm.merge_tensors("ties", tvs, [1, 1], density=1.5),
        lambda: mm.merge_tensors("dare_linear", tvs, [1, 1], density=0.0),
        lambda: mm.merge_tensors("ties", tvs, [1, 1], majority="mean"),
        lambda: mm.elect_sign(tvs, "mean"),
    ]
    for case in cases:
        with pytest.raises(ConfigError) as err:
            case()
        assert isinstance(err.value, HeadstartError) and "\n" not in str(err.value)
