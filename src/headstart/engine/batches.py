"""Batch plans: which examples every optimizer step sees, decided up front from (seed, epoch).

A plan is a pure function of its arguments, so a run is reproducible, a resumed run skips exactly
the steps already done, and every process of an `accelerate launch` run computes the same plan
and takes its own share of each batch (`shard`). A batch is a list of example indices, or a tuple
of such lists (a source batch and a target batch for the two-domain losses).

    plan = EpochShuffle(n=len(train), batch_size=16, epochs=3, seed=0)
    plan.batches(epoch=0)  # [[17, 3, ...], ...]: one epoch's batches
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union

import torch

Batch = Union[list[int], tuple[list[int], ...]]


class BatchPlan(Protocol):
    epochs: int

    def batches(self, epoch: int) -> list[Batch]:
        """Every batch of one epoch, in order."""


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """This process's share of a batch: every `world`-th example from `rank` (of each list of a tuple)."""
    if isinstance(batch, tuple):
        return tuple(shard(b, rank, world) for b in batch)
    return batch[rank::world]


def batch_size_of(batch: Batch) -> int:
    """Examples in a batch (the first list's length for a tuple: the source side of a paired batch)."""
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """`batch` cut into consecutive parts of at most `size` examples (0: the whole batch), for gradient
    accumulation; each list of a tuple is cut into the same number of near-equal parts."""
    n = batch_size_of(batch)
    if not size or n <= size:
        return [batch]
    parts = -(-n // size)
    if isinstance(batch, tuple):
        return [tuple(b[k * len(b) // parts:(k + 1) * len(b) // parts] for b in batch) for k in range(parts)]
    return [batch[k * size:(k + 1) * size] for k in range(parts)]


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass
class EpochShuffle:
    """Each epoch a fresh permutation of all n examples, cut into batches (the last may be smaller)."""

    n: int
    batch_size: int
    epochs: int
    seed: int = 0

    def batches(self, epoch: int) -> list[Batch]:
        order = _permutation(self.n, self.seed * 100_003 + epoch)
        return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]


@dataclass
class PairedDomains:
    """An epoch is one pass over the labelled source; each source batch is paired with as many target
    examples, the target cycled in its own seeded order (DANN / Deep CORAL steps)."""

    n_source: int
    n_target: int
    batch_size: int
    epochs: int
    seed: int = 0

    def batches(self, epoch: int) -> list[Batch]:
        src = _permutation(self.n_source, self.seed * 100_003 + epoch)
        tgt = _permutation(self.n_target, self.seed * 100_003 + epoch + 50_000)
        out: list[Batch] = []
        for step in range(max(1, math.ceil(self.n_source / self.batch_size))):
            s_idx = src[step * self.batch_size:(step + 1) * self.batch_size]
            out.append((s_idx, [tgt[(step * self.batch_size + j) % self.n_target] for j in range(len(s_idx))]))
        return out


@dataclass
class LengthGrouped:
    """Batches of similar lengths in random order (HF's `group_by_length`), reshuffled every epoch."""

    lengths: Sequence[int]
    batch_size: int
    epochs: int
    seed: int = 0

    def batches(self, epoch: int) -> list[Batch]:
        return length_grouped_batches(list(self.lengths), self.batch_size, self.seed * 1000 + epoch)


@dataclass
class ClassBalanced:
    """`steps` batches drawing evenly from every class, so each batch holds positive pairs (SetFit).
    One epoch of `steps` steps: the contrastive phase is sized in steps, not passes."""

    labels: Sequence[int]
    batch_size: int
    steps: int
    seed: int = 0
    epochs: int = 1

    def batches(self, epoch: int) -> list[Batch]:
        return balanced_batches(list(self.labels), self.batch_size, self.steps, self.seed + epoch)


@dataclass
class PerEpoch:
    """Any seeded rule `order(epoch) -> batches` (e.g. DPO's plain shuffle of pairs)."""

    order: Callable[[int], list[Batch]]
    epochs: int

    def batches(self, epoch: int) -> list[Batch]:
        return self.order(epoch)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order (HF's `group_by_length`).

    Indices are shuffled (seeded), sorted by length within mega-chunks of `50 * batch_size`, cut
    into batches, and the batches shuffled (seeded). The batch holding the longest sequence is
    moved to the front, so an out-of-memory shows in the first step, not hours in.
    Every index appears exactly once; only the last batch of a mega-chunk may be smaller.
    """
    if batch_size < 1:
        from ..core.errors import ConfigError

        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def balanced_batches(labels: list[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices, each drawing evenly from every class (so each batch has positive
    pairs), cycling through each class's examples in a seeded shuffled order."""
    rng = random.Random(seed)
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels))]
    queues: list[list[int]] = [[] for _ in by_class]
    per_class = max(2, batch_size // len(by_class))
    batches = []
    for _ in range(steps):
        batch: list[int] = []
        for c, members in enumerate(by_class):
            for _ in range(min(per_class, len(members))):
                if not queues[c]:
                    queues[c] = rng.sample(members, len(members))
                batch.append(queues[c].pop())
        batches.append(sorted(set(batch)))
    return batches
