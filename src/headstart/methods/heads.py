"""Linear heads set from a closed-form solve (probe, CORAL, AdaBN, self-training, SetFit), and the one
L2 grid those solves search."""
from __future__ import annotations

import torch
from torch import nn

L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
"""L2 strengths tried on a held-out 10% of train by `fit_head_with_l2_search`; the best is refitted on all.

A tuple so no caller can change it for the others; configs copy it into a list field."""


def default_l2_grid() -> list[float]:
    """A fresh list of `L2_GRID`, for a config dataclass's `field(default_factory=default_l2_grid)`."""
    return list(L2_GRID)


def set_linear(head: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a solved weight [C, D] and bias [C] into `head` in place (no autograd history).

    >>> w, b = fit_linear_head(x, y, num_classes, l2=1e-3)
    >>> set_linear(model.head, w, b)
    """
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
