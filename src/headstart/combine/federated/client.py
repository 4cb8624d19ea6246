"""A Flower client that is a headstart specialist trained on its own shard.

The server dictates the recipe (base, method, options, label set, seed) in every round's config, so a
client process needs only its data and the server's address. A process builds its base once and reuses
it for every round and every client it plays (a simulation runs several clients per worker): each
round starts by loading the global tensors, so nothing of another client's shard leaks across.

Shards are described by plain data (paths, columns, indices), which is all a simulation worker gets.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from flwr.client import NumPyClient

from .model import Party, payload_bytes, remap_labels, round_lr_factor
from .warmup import class_statistics

_PARTIES: dict[str, Party] = {}
_DATASETS: dict[str, Any] = {}


@dataclass
class Shard:
    """Where one client's examples are: a dataset (folder or table) and, for a split of it, the indices of
    its training examples (None: the whole training split, as `by-file` and real client processes use)."""

    data: str
    indices: list[int] | None = None
    text_column: str = "text"
    label_column: str = "label"
    seed: int = 0
    name: str = "client"

    def load(self):
        """(train split, test split or None, the dataset's own class names)."""
        from ...data import load_dataset

        key = json.dumps([self.data, self.text_column, self.label_column, self.seed])
        if key not in _DATASETS:
            _DATASETS[key] = load_dataset(self.data, text_column=self.text_column, label_column=self.label_column,
                                          seed=self.seed)
        dataset = _DATASETS[key]
        train = dataset.split("train")
        if self.indices is not None:
            return train.subset(self.indices), None, dataset.classes
        test = dataset.splits.get("test")
        return train, test, dataset.classes


def party_for(recipe: str) -> Party:
    """The process's party for a recipe (JSON: base, method, options, classes, seed), built once."""
    if recipe not in _PARTIES:
        spec = json.loads(recipe)
        _PARTIES[recipe] = Party(spec["base"], spec["method"], spec["classes"], spec["options"], spec["seed"])
    return _PARTIES[recipe]


class ShardClient(NumPyClient):
    """fit = load the global tensors, train local epochs on the shard, send the trained tensors back."""

    def __init__(self, shard: Shard, log=print):
        self.shard, self.log = shard, log

    def _party_and_splits(self, config):
        party = party_for(str(config["recipe"]))
        train, test, own = self.shard.load()
        train = remap_labels(train, own, party.classes)
        test = remap_labels(test, own, party.classes) if test is not None else None
        return party, train, test

    def get_parameters(self, config) -> list:
        return party_for(str(config["recipe"])).get_arrays()

    def fit(self, parameters, config):
        party, train, _ = self._party_and_splits(config)
        party.set_arrays(parameters)
        if config.get("stage") == "statistics":  # the round before training: see warmup.py
            statistics = class_statistics(party, train)
            return statistics, len(train), {"bytes_up": payload_bytes(statistics), "bytes_down": payload_bytes(parameters)}
        # A seed per (round, client): shuffles differ between clients and rounds yet rerun identically.
        seed = int(config["seed"]) * 100_003 + int(config["round"]) * 1_009 + _stable_id(self.shard.name)
        factor = round_lr_factor(int(config["round"]), int(config["rounds"]))
        loss = party.train(train, epochs=int(config["local_epochs"]), proximal_mu=float(config.get("proximal_mu", 0.0)),
                           seed=seed, log=self.log, lr_factor=factor)
        arrays = party.get_arrays()
        metrics = {"train_loss": loss, "bytes_up": payload_bytes(arrays), "bytes_down": payload_bytes(parameters)}
        return arrays, len(train), metrics

    def evaluate(self, parameters, config):
        party, _, test = self._party_and_splits(config)
        if test is None or not len(test):
            return 0.0, 0, {}
        party.set_arrays(parameters)
        return 0.0, len(test), {"accuracy": party.accuracy(test)}


def _stable_id(name: str) -> int:
    """A per-client number that does not depend on Python's per-process hash seed."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 1_000


def shard_to_json(shard: Shard) -> dict[str, Any]:
    return asdict(shard)
