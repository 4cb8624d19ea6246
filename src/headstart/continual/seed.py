"""The memory of a bundle made by `fit`, built on its first update from the data it was fitted on.

`fit` records where its data came from (`manifest.data.source`). When that data is still on this
machine, the first update gets what later versions carry: night 1's guard set (from the split the fit
held out: never trained on) and a reservoir of its training examples. When it is gone, night 1 has no
guard set, and the report says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..data.sampling import per_class_sample
from .memory import GUARD_CAP, ExampleSet, Memory, NightRecord

REPLAY_SIZE = 1000


def seed_memory(spec, store: str, opts, version: int, features: Callable[[list], torch.Tensor]) -> Memory:
    """Night 1's memory for the fit-made version `version` of `spec` (empty when its data is gone)."""
    from ..core.errors import DataError
    from ..data import load_dataset
    from .update import seeded_rng

    memory = Memory(store, kind=spec.kind, replay_size=REPLAY_SIZE)
    data_facts = spec.manifest.get("data", {})
    source = data_facts.get("source")
    if store == "none" or not source or not Path(source).exists():
        opts.log(f"update: the data version {version} was fitted on ({source or 'unknown'}) is not here: "
                 "its night has no guard set and nothing to replay")
        return memory
    columns = data_facts.get("columns", {})
    try:
        data = load_dataset(source, seed=spec.manifest.get("seed", 0), **columns)
    except DataError as e:
        opts.log(f"update: cannot re-read {source} ({e}): night 1 has no guard set")
        return memory
    names = [c for c in data.classes if c in spec.classes]
    held = data.split(data.eval_split) if data.eval_split != "train" else None
    train = data.split("train")
    if held is not None and len(held):
        memory.nights.append(NightRecord(1, version, {"source": Path(source).name, "examples": len(train),
                                                      "seeded_from": "the data the fit recorded"},
                                         _stored(data, held, GUARD_CAP, store, features, opts.seed, source)))
    quota = max(1, REPLAY_SIZE // max(1, len(names)))
    replay = _stored(data, train, quota * len(data.classes), store, features, opts.seed, source, per_class=quota)
    memory.offer(replay, REPLAY_SIZE, seeded_rng(opts.seed, "seed"))
    return memory


def _stored(data, split, cap: int, store: str, features, seed: int, source: str, per_class: int | None = None
            ) -> ExampleSet:
    """Up to `cap` examples of `split` (class-balanced), as the store keeps them."""
    from ..engine.features import item_key

    per = per_class or max(1, cap // max(1, len(data.classes)))
    idx = sorted(per_class_sample(split.labels, len(data.classes), per, seed))[:cap]
    items = [split.items[i] for i in idx]
    labels = [data.classes[split.labels[i]] for i in idx]
    keys = [item_key(x, is_file=data.kind == "image") for x in items]
    if store == "features":
        return ExampleSet(labels, keys, features=features(items).float())
    if store == "raw":
        return ExampleSet(labels, keys, raw=[str(x) for x in items])
    refs = [str(Path(x).resolve()) if data.kind == "image" else str(Path(source).resolve()) for x in items]
    return ExampleSet(labels, keys, refs=refs)
