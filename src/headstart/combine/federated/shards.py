"""The federation's data: the clients' shards, the label set they share and the server's test split.

One dataset dealt by `iid` / `dirichlet:ALPHA`, or one table per client (`by-file`, e.g. the Amazon
domains). The server measures the global model on the dataset's test split (by-file: the union of the
files' test splits), which no client trains on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import ConfigError
from .client import Shard
from .split import parse_split, split_indices


@dataclass
class Setup:
    kind: str
    classes: list[str]
    test: Any
    """The server's held-out `Split` (labels in `classes` order)."""
    source: str
    shards: list[Shard] = field(default_factory=list)
    clients: int = 0

    def default_base(self) -> str:
        from ...tasks.classify import DEFAULT_BASE

        return DEFAULT_BASE[self.kind]

    def shard_sizes(self) -> list[int]:
        return [len(s.indices) if s.indices is not None else len(s.load()[0]) for s in self.shards]

    @classmethod
    def build(cls, data, clients: int, split: str, seed: int, text_column: str, label_column: str,
              server: bool) -> "Setup":
        """Simulation: deal `data` to `clients` by `split`. Server: only the label set and the test split."""
        name, _ = parse_split(split)
        paths = [Path(p) for p in data] if isinstance(data, (list, tuple)) else [Path(data)]
        if server:
            return _server_side(paths, clients, seed, text_column, label_column)
        if name == "by-file":
            return _by_file(paths, seed, text_column, label_column)
        if len(paths) != 1:
            raise ConfigError(f"{len(paths)} data paths with split {split!r}: several files need split='by-file'")
        return _dealt(paths[0], clients, split, seed, text_column, label_column)


def _load(path: Path, seed: int, text_column: str, label_column: str):
    from ...data import load_dataset

    return load_dataset(path, text_column=text_column, label_column=label_column, seed=seed)


def _dealt(path: Path, clients: int, split: str, seed: int, text_column: str, label_column: str) -> Setup:
    dataset = _load(path, seed, text_column, label_column)
    train = dataset.split("train")
    parts = split_indices(train.labels, clients, split, seed)
    shards = [Shard(data=str(path), indices=part, text_column=text_column, label_column=label_column, seed=seed,
                    name=f"client-{i}") for i, part in enumerate(parts)]
    return Setup(dataset.kind, list(dataset.classes), dataset.split(dataset.eval_split), str(path), shards, clients)


def _by_file(paths: list[Path], seed: int, text_column: str, label_column: str) -> Setup:
    """One client per file (or folder); the label set is their union; the test split is their tests' union."""
    from ...data import Split
    from .model import remap_labels

    if len(paths) < 2:
        raise ConfigError("split by-file needs one data file per client: give two or more")
    datasets = [_load(p, seed, text_column, label_column) for p in paths]
    kinds = {d.kind for d in datasets}
    if len(kinds) > 1:
        raise ConfigError(f"by-file clients mix {' and '.join(sorted(kinds))} data")
    classes = sorted({c for d in datasets for c in d.classes})
    test = Split([], [])
    for d in datasets:
        part = remap_labels(d.split(d.eval_split), d.classes, classes)
        test = Split(test.items + part.items, test.labels + part.labels)
    names = _client_names(paths)
    shards = [Shard(data=str(p), indices=None, text_column=text_column, label_column=label_column, seed=seed, name=n)
              for p, n in zip(paths, names)]
    return Setup(kinds.pop(), classes, test, ", ".join(map(str, paths)), shards, len(shards))


def _server_side(paths: list[Path], clients: int, seed: int, text_column: str, label_column: str) -> Setup:
    if len(paths) != 1:
        raise ConfigError("a server measures the global model on one dataset: give one data path")
    dataset = _load(paths[0], seed, text_column, label_column)
    return Setup(dataset.kind, list(dataset.classes), dataset.split(dataset.eval_split), str(paths[0]), [], clients)


def _client_names(paths: list[Path]) -> list[str]:
    """`books_train.csv` -> `books`; a folder keeps its name; repeats get a number."""
    names = []
    for p in paths:
        stem = p.stem if p.is_file() else p.name
        for suffix in ("_train", "-train", "_all"):
            stem = stem.removesuffix(suffix)
        names.append(stem if stem not in names else f"{stem}-{len(names)}")
    return names
