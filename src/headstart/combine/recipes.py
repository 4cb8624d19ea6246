"""A merge recipe (method, a weight per specialist, density) and what it makes of the specialists'
task vectors, heads and statistics. `auto` and greedy soups try many recipes; each is cheap to apply.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from .ingredients import Ingredient, aligned_head

WEIGHTED = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude")
"""Methods whose weights scale task vectors (lambda); `linear` and `soup` average (weights sum to 1)."""
METHODS = ("soup", "linear", *WEIGHTED, "auto")
DEFAULT_SCALE = {"task_arithmetic": 0.5, "magnitude": 0.5, "dare_linear": 0.5, "ties": 1.0, "dare_ties": 1.0}
"""lambda when none is given: task arithmetic sums task vectors, so it needs < 1 for several tasks
(Ilharco et al. pick 0.3-0.5 on held-out data); TIES' disjoint mean already averages (lambda 1, Yadav et al.)."""
AUTO_GRID = [("linear", None, 1.0), *[("task_arithmetic", s, 1.0) for s in (0.3, 0.5, 0.7, 1.0)],
             *[("ties", s, d) for d in (0.2, 0.5) for s in (0.7, 1.0)],
             *[("dare_ties", 1.0, d) for d in (0.2, 0.5)], *[("dare_linear", s, 0.5) for s in (0.5, 1.0)]]
"""(method, lambda, density) that `auto` scores on the selection split: the ranges the papers tuned over."""


@dataclass(frozen=True)
class Recipe:
    method: str
    """linear (weighted average) | task_arithmetic | ties | dare_linear | dare_ties | magnitude."""
    weights: tuple[float, ...]
    """One per specialist, in the order given; 0 leaves one out (a greedy soup's rejects)."""
    density: float = 1.0
    """Share of each task vector kept (TIES' trim, DARE's keep probability, magnitude pruning)."""
    majority: str = "total"
    """TIES' sign election: `total` (sum of values) or `frequency` (count of signs)."""

    @property
    def members(self) -> list[int]:
        return [i for i, w in enumerate(self.weights) if w != 0]

    def label(self) -> str:
        ws = sorted(set(round(w, 3) for w in self.weights if w))
        scale = f" w={ws[0]:g}" if len(ws) == 1 else f" w={[round(w, 3) for w in self.weights]}"
        dens = f" density={self.density:g}" if self.method in ("ties", "dare_linear", "dare_ties", "magnitude") else ""
        members = "" if len(self.members) == len(self.weights) else f" of {[i + 1 for i in self.members]}"
        return f"{self.method}{scale}{dens}{members}"

    def to_json(self) -> dict:
        return {"method": self.method, "weights": list(self.weights), "density": self.density,
                "majority": self.majority, "label": self.label()}


def make_recipe(method: str, n: int, weights: list[float] | None, scale: float | None, density: float,
                majority: str = "total") -> Recipe:
    """The recipe a user asked for (`soup` and `linear` average; the rest scale by lambda)."""
    if method not in METHODS or method == "auto":
        raise ConfigError(f"unknown merge method {method!r} (known: {', '.join(METHODS)})")
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if majority not in ("total", "frequency"):
        raise ConfigError(f"majority must be 'total' or 'frequency', got {majority!r}")
    if weights is not None and len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} specialists: give one per specialist")
    if method in ("soup", "linear"):
        ws = weights if weights is not None else [1.0] * n
        total = sum(ws)
        if total <= 0:
            raise ConfigError("averaging weights must sum to more than 0")
        return Recipe("linear", tuple(w / total for w in ws), 1.0, majority)
    lam = DEFAULT_SCALE[method] if scale is None else scale
    ws = [w * lam for w in weights] if weights is not None else [lam] * n
    return Recipe(method, tuple(ws), density if method != "task_arithmetic" else 1.0, majority)


def grid(n: int) -> list[Recipe]:
    """`auto`'s candidates for n specialists."""
    out = []
    for method, scale, density in AUTO_GRID:
        out.append(make_recipe(method, n, None, scale, density))
    return list(dict.fromkeys(out))


def uniform(members: list[int], n: int) -> Recipe:
    """A uniform soup of `members` (indices into the n specialists)."""
    return Recipe("linear", tuple(1.0 / len(members) if i in members else 0.0 for i in range(n)))


def combine_deltas(ings: list[Ingredient], recipe: Recipe, seed: int) -> dict[str, torch.Tensor]:
    """The merged task vector, parameter by parameter (a parameter one specialist leaves alone is 0 there)."""
    from .merge_math import merge_tensors

    members = recipe.members
    names = sorted({name for i in members for name in ings[i].deltas})
    out = {}
    for name in names:
        ref = next(ings[i].deltas[name] for i in members if name in ings[i].deltas)
        tvs = [ings[i].deltas.get(name, torch.zeros_like(ref)).float() for i in members]
        # DARE drops at random: one generator per parameter, seeded by its name, so a merge is reproducible.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        out[name] = merge_tensors(recipe.method, tvs, [recipe.weights[i] for i in members], density=recipe.density,
                                  generator=gen, majority=recipe.majority)
    return out


def averaging_weights(recipe: Recipe) -> dict[int, float]:
    """Heads and statistics have no pretrained value to take a task vector from: they are averaged over the
    recipe's members, in proportion to their weights."""
    members = recipe.members
    total = sum(abs(recipe.weights[i]) for i in members)
    return {i: abs(recipe.weights[i]) / total for i in members}


def combine_heads(ings: list[Ingredient], recipe: Recipe, classes: list[str]) -> dict[str, torch.Tensor]:
    """One head for specialists of one label set: their heads (rows aligned by label) averaged."""
    share = averaging_weights(recipe)
    heads = {i: aligned_head(ings[i], classes) for i in share}
    return {k: sum(share[i] * heads[i][k].float() for i in share) for k in ("head.weight", "head.bias")}


def combine_buffers(ings: list[Ingredient], recipe: Recipe) -> dict[str, torch.Tensor]:
    """Finetune bundles' BatchNorm statistics, averaged over the members that store them."""
    share = averaging_weights(recipe)
    names = sorted({k for i in share for k in ings[i].buffers})
    out = {}
    for name in names:
        having = {i: w for i, w in share.items() if name in ings[i].buffers}
        total = sum(having.values())
        out[name] = sum(w / total * ings[i].buffers[name] for i, w in having.items())
    return out


def alone(n: int, i: int) -> Recipe:
    """Specialist i of n by itself (weight 1): how the report scores each ingredient through the same path."""
    return Recipe("linear", tuple(1.0 if j == i else 0.0 for j in range(n)))
