"""The head a federation starts from: the federated counterpart of `fit`'s LP-FT probe head.

`fit` starts the head as a logistic probe on the untouched base's features (LP-FT), which needs every
example in one place. A linear discriminant needs only sums, and sums add up across clients: so the
first round of a federation collects each client's class sums of features, class counts and feature
second moments, and the server turns the pooled moments into a shrinkage-LDA head. The training rounds
then start from a head that already separates the classes instead of a random one, as centralised
training does (closed-form heads first, then federated fine-tuning: Fed3R, Fani et al. 2024; FedNCM,
Legate et al. 2023).

What leaves a client in that round: per-class means of its features (the information a head trained on
its shard carries, in a more direct form). With differential privacy on, the round is skipped (its
statistics are not clipped or noised) and the head starts random.
"""
from __future__ import annotations

import numpy as np
import torch

from ...core.errors import ConfigError

HEAD_KEYS = ("head.weight", "head.bias")
SHRINKAGE = 0.1
"""Weight of the scaled identity in the pooled covariance: keeps the solve well conditioned when a
federation has few examples per feature dimension (the probe's L2 plays this part in `fit`)."""


def class_statistics(party, split) -> list[np.ndarray]:
    """[class sums [C, D], class counts [C], second moment [D, D]], each divided by the shard's size:
    Flower's FedAvg weights every client by its size, so the average is the pooled moments."""
    from ...engine.features import encode
    from ...methods.base import loader_for

    if not len(split):
        raise ConfigError("a client has no training examples: it cannot send class statistics")
    x = encode(party.model.base, split.items, loader_for(party.kind), 64, progress=False).double()
    y = torch.tensor(split.labels)
    sums = torch.zeros(len(party.classes), x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=len(party.classes)).double()
    n = float(len(split))
    return [(t / n).float().numpy() for t in (sums, counts, x.T @ x)]


def lda_head(statistics: list[np.ndarray], shrinkage: float = SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear discriminant (W [C, D], b [C]) from pooled moments: W = S^-1 mu_c, b = -mu_c S^-1 mu_c / 2 +
    log p_c, with S the within-class covariance shrunk towards a scaled identity. A class no client holds
    gets a zero row and a bias below every other class's (never predicted until training moves it)."""
    sums, counts, second = (torch.from_numpy(np.asarray(a)).double() for a in statistics)
    present = counts > 0
    if not bool(present.any()):
        raise ConfigError("the class statistics hold no examples")
    means = torch.zeros_like(sums)
    means[present] = sums[present] / counts[present, None]
    within = second - (means[present].T * counts[present]) @ means[present]
    dim = within.shape[0]
    cov = (1 - shrinkage) * within + shrinkage * (within.trace() / dim) * torch.eye(dim, dtype=torch.float64)
    weight = torch.linalg.solve(cov, means.T).T
    bias = -0.5 * (weight * means).sum(1) + torch.log(counts.clamp_min(1e-12))
    weight[~present] = 0.0
    bias[~present] = bias[present].min() - 10.0
    return weight.float(), bias.float()


def arrays_with_head(keys: list[str], arrays: list[np.ndarray], weight: torch.Tensor, bias: torch.Tensor) -> list[np.ndarray]:
    """`arrays` (in the party's key order) with the head replaced."""
    missing = [k for k in HEAD_KEYS if k not in keys]
    if missing:
        raise ConfigError(f"the trained tensors have no {missing[0]}: cannot start the head from class statistics")
    out = [np.array(a, copy=True) for a in arrays]
    out[keys.index("head.weight")] = weight.numpy().astype(out[keys.index("head.weight")].dtype)
    out[keys.index("head.bias")] = bias.numpy().astype(out[keys.index("head.bias")].dtype)
    return out


def head_maker(party, initial: list[np.ndarray]):
    """The server's side: pooled statistics -> the starting tensors (`initial` with the discriminant head)."""
    return lambda statistics: arrays_with_head(party.keys, initial, *lda_head(statistics))


def probe_head(party, split) -> None:
    """A client training alone starts as `fit` does: its head is a logistic probe on its own shard."""
    from ...engine.features import encode
    from ...methods.base import loader_for
    from ...methods.heads import set_linear
    from ...methods.probe.method import fit_linear_head

    x = encode(party.model.base, split.items, loader_for(party.kind), 64, progress=False)
    weight, bias = fit_linear_head(x, torch.tensor(split.labels), len(party.classes), l2=1e-2)
    set_linear(party.model.head, weight, bias)
