"""Merge maths on task vectors: pure tensor functions, no I/O.

A task vector is what fine-tuning changed: `tuned - pretrained` for one parameter (or a LoRA module's exact
dense delta B·A·scale, see `lora_delta`). Every function here takes the task vectors of ONE parameter
(`tvs`, same shape) and returns one tensor of that shape.

The definitions follow TIES-Merging (Yadav et al. 2023: trim, elect sign, disjoint merge), DARE (Yu et al.
2024: drop at random, rescale by 1/density) and PEFT's `peft.utils.merge_utils`; tests/test_merge_math.py
checks them against PEFT's functions on the same inputs. One deliberate difference: `ties` / `dare_ties`
elect the sign on the WEIGHTED task vectors, where PEFT elects it on the unweighted ones and applies the
weights afterwards. With equal positive weights (or majority="frequency" and positive weights) the two agree
exactly; with unequal weights ours lets a heavier task count for more in the vote, and a negative weight
(task negation) votes with its flipped sign instead of being kept where its original sign wins.

>>> import torch
>>> linear([torch.ones(2), torch.zeros(2)], [0.5, 0.5])
tensor([0.5000, 0.5000])
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..core.errors import ConfigError

if TYPE_CHECKING:  # torch is imported inside the functions: `headstart.combine` stays cheap to import
    import torch

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude")
MAJORITY = ("total", "frequency")


def _weighted(tvs: Sequence["torch.Tensor"], weights: Sequence[float]) -> "torch.Tensor":
    """The task vectors stacked on a new dim 0, each multiplied by its weight: (n, *shape)."""
    import torch

    if len(tvs) == 0:
        raise ConfigError("merging needs at least one task vector")
    if len(weights) != len(tvs):
        raise ConfigError(f"{len(tvs)} task vectors but {len(weights)} weights: give one weight per task vector")
    shape = tvs[0].shape
    for tv in tvs[1:]:
        if tv.shape != shape:
            raise ConfigError(f"task vectors of different shapes ({tuple(shape)} vs {tuple(tv.shape)}) do not merge")
    stacked = torch.stack(list(tvs), dim=0)
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(-1, *([1] * len(shape)))


def linear(tvs: Sequence["torch.Tensor"], weights: Sequence[float]) -> "torch.Tensor":
    """sum_i w_i * tv_i. On weights (not task vectors) with w_i = 1/n this is the uniform model soup.

    >>> import torch
    >>> linear([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])], [1.0, 0.5])
    tensor([2.5000, 2.0000])
    """
    return _weighted(tvs, weights).sum(dim=0)


def task_arithmetic(tvs: Sequence["torch.Tensor"], weights: Sequence[float]) -> "torch.Tensor":
    """Task arithmetic (Ilharco et al. 2023): the same maths as `linear`, kept under PEFT's name."""
    return linear(tvs, weights)


def _check_density(density: float, *, allow_zero: bool) -> None:
    low_ok = density >= 0 if allow_zero else density > 0
    if not (low_ok and density <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"density must lie in {bound} (the share of each task vector kept), got {density}")


def magnitude_prune(tv: "torch.Tensor", density: float) -> "torch.Tensor":
    """Keep the `density` share of entries with the largest |value| (k = int(density * numel), as PEFT),
    zero the rest. density 1 returns `tv` itself.

    >>> import torch
    >>> magnitude_prune(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
    tensor([ 0., -3.,  2.,  0.])
    """
    import torch

    _check_density(density, allow_zero=True)
    if density >= 1:
        return tv
    k = int(density * tv.numel())
    mask = torch.zeros(tv.numel(), dtype=tv.dtype, device=tv.device)
    mask[torch.topk(tv.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tv * mask.view(tv.shape)


def elect_sign(tvs: Sequence["torch.Tensor"], method: str = "total") -> "torch.Tensor":
    """The majority sign per entry, +1 or -1 (a tie, or all zeros, gives +1 as in PEFT).

    "total": the sign of the sum (TIES: the sign with the larger total mass);
    "frequency": the sign most task vectors have there.
    """
    import torch

    stacked = torch.stack(list(tvs), dim=0)
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = stacked.sign().sum(dim=0)
    else:
        raise ConfigError(f"majority must be one of {', '.join(MAJORITY)}, got {method!r}")
    one = torch.ones((), dtype=stacked.dtype, device=stacked.device)
    return torch.where(mass >= 0, one, -one)


def disjoint_merge(tvs: Sequence["torch.Tensor"], sign: "torch.Tensor") -> "torch.Tensor":
    """Per entry, the mean over the task vectors whose value has sign `sign` there; zeros never count (an
    entry no task vector agrees on stays 0)."""
    import torch

    stacked = torch.stack(list(tvs), dim=0)
    agrees = stacked.sign() == sign.unsqueeze(0)
    kept = (stacked * agrees).sum(dim=0)
    return kept / agrees.sum(dim=0).clamp(min=1).to(stacked.dtype)


def ties(tvs: Sequence["torch.Tensor"], weights: Sequence[float], density: float,
         majority: str = "total") -> "torch.Tensor":
    """TIES: trim each task vector to its top `density` by magnitude, weight, elect the sign, disjoint merge.

    The weights scale task vectors INSIDE a mean: weights 1.0 give the paper's merge (lambda = 1); weights
    1/n give 1/n of it. The sign is elected on the weighted vectors (see the module docstring).
    """
    trimmed = [magnitude_prune(tv, density) for tv in tvs]
    weighted = list(_weighted(trimmed, weights))
    return disjoint_merge(weighted, elect_sign(weighted, majority))


def dare_drop(tv: "torch.Tensor", density: float, generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """DARE: keep each entry with probability `density`, rescale the kept ones by 1/density (the expected
    value is unchanged). density 1 returns `tv` and draws nothing. `generator` None uses torch's global RNG.
    """
    import torch

    _check_density(density, allow_zero=False)
    if density >= 1:
        return tv
    keep = torch.bernoulli(torch.full_like(tv, density), generator=generator)
    return tv * keep / density


def dare_linear(tvs: Sequence["torch.Tensor"], weights: Sequence[float], density: float,
                generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """DARE drop (one mask per task vector, drawn in order) then `linear`."""
    return linear([dare_drop(tv, density, generator) for tv in tvs], weights)


def dare_ties(tvs: Sequence["torch.Tensor"], weights: Sequence[float], density: float,
              generator: "torch.Generator | None" = None, majority: str = "total") -> "torch.Tensor":
    """DARE drop (one mask per task vector, drawn in order), weight, elect the sign, disjoint merge."""
    dropped = [dare_drop(tv, density, generator) for tv in tvs]
    weighted = list(_weighted(dropped, weights))
    return disjoint_merge(weighted, elect_sign(weighted, majority))


def merge_tensors(method: str, tvs: Sequence["torch.Tensor"], weights: Sequence[float], density: float = 1.0,
                  generator: "torch.Generator | None" = None, majority: str = "total") -> "torch.Tensor":
    """One merged tensor by `method` (one of METHODS); "magnitude" = magnitude_prune each, then `linear`.

    >>> import torch
    >>> merge_tensors("ties", [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], [1.0, 1.0])
    tensor([ 2., -2.])
    """
    if majority not in MAJORITY:
        raise ConfigError(f"majority must be one of {', '.join(MAJORITY)}, got {majority!r}")
    if method in ("linear", "task_arithmetic"):
        return linear(tvs, weights)
    if method == "magnitude":
        return linear([magnitude_prune(tv, density) for tv in tvs], weights)
    if method == "ties":
        return ties(tvs, weights, density, majority)
    if method == "dare_linear":
        return dare_linear(tvs, weights, density, generator)
    if method == "dare_ties":
        return dare_ties(tvs, weights, density, generator, majority)
    raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
