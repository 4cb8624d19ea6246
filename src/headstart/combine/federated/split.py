"""How the examples are dealt to the clients: `iid`, `dirichlet:ALPHA` (label skew) and `by-file`.

Pure Python + NumPy (no torch): the shards are lists of indices into the training split, seeded, and
every client gets at least one example (an empty client would send FedAvg a zero-weight update and make
"client alone" accuracy undefined).

    shards = split_indices(labels, clients=10, split="dirichlet:0.3", seed=0)
"""
from __future__ import annotations

from typing import Sequence

from ...core.errors import ConfigError

SPLITS = ("iid", "dirichlet:ALPHA", "by-file")


def parse_split(split: str) -> tuple[str, float]:
    """`"dirichlet:0.3"` -> ("dirichlet", 0.3); `"iid"` -> ("iid", 0.0); refuses anything else by name."""
    name, _, arg = split.partition(":")
    if name in ("iid", "by-file") and not arg:
        return name, 0.0
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ConfigError(f"split {split!r}: write dirichlet:ALPHA with ALPHA a number > 0, e.g. dirichlet:0.3") from None
        if not alpha > 0:
            raise ConfigError(f"split {split!r}: the Dirichlet concentration must be > 0")
        return name, alpha
    raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def split_indices(labels: Sequence[int], clients: int, split: str = "iid", seed: int = 0) -> list[list[int]]:
    """Deal the indices of `labels` to `clients` shards (sorted index lists, none empty).

    `iid`: a seeded shuffle cut into near-equal parts. `dirichlet:ALPHA`: for every class, its examples
    are divided among the clients in proportions drawn from Dirichlet(ALPHA) (Hsu et al. 2019): small
    ALPHA = each client sees few classes. `by-file` is decided by the caller (one table per client).
    """
    import numpy as np

    name, alpha = parse_split(split)
    if name == "by-file":
        raise ConfigError("split by-file deals whole tables: pass one data file per client instead")
    if clients < 1:
        raise ConfigError(f"clients must be >= 1, got {clients}")
    if len(labels) < clients:
        raise ConfigError(f"{len(labels)} training examples cannot give {clients} clients one each")
    rng = np.random.default_rng(seed)
    if name == "iid":
        order = rng.permutation(len(labels))
        return [sorted(part.tolist()) for part in np.array_split(order, clients)]
    return _dirichlet(np.asarray(labels), clients, alpha, rng)


def _dirichlet(labels, clients: int, alpha: float, rng) -> list[list[int]]:
    import numpy as np

    shards: list[list[int]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for shard, part in zip(shards, np.split(members, cuts)):
            shard.extend(part.tolist())
    _fill_empty(shards, rng)
    return [sorted(s) for s in shards]


def _fill_empty(shards: list[list[int]], rng) -> None:
    """A client the draw left empty takes one example from the largest shard (seeded: reproducible)."""
    for shard in shards:
        if not shard:
            donor = max(shards, key=len)
            shard.append(donor.pop(int(rng.integers(len(donor)))))


def label_histogram(labels: Sequence[int], shards: list[list[int]], num_classes: int) -> list[list[int]]:
    """Examples per (client, class): what the report shows to make the skew visible."""
    counts = [[0] * num_classes for _ in shards]
    for row, shard in zip(counts, shards):
        for i in shard:
            row[labels[i]] += 1
    return counts
