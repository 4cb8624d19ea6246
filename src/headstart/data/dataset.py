"""One labelled dataset with named splits, from an image folder or text tables.

    data = load_dataset("../shared/data/hymenoptera")      # train/ + val/ folders
    data = load_dataset("../shared/data/trec")             # train.csv + test.csv
    data = load_dataset("reviews.jsonl", text_column="body", label_column="stars")  # split by headstart
    eight = data.with_shots(8, seed=1)                     # 8 training examples per class

Split names are normalised: `dev` is `val`. Evaluation uses `test` when there is one, else `val`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import DataError
from .images import IMAGE_SUFFIXES, list_class_folders, scan_class_folders
from .sampling import per_class_sample, stratified_indices
from .tables import TABLE_SUFFIXES, read_table

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


@dataclass
class Split:
    items: list[Any]
    """Image paths or texts."""
    labels: list[int]
    """Index into `Dataset.classes`."""

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: list[int]) -> "Split":
        return Split([self.items[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class Dataset:
    kind: str
    """`image` or `text`."""
    classes: list[str]
    splits: dict[str, Split]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file or row, reason) for everything left out."""
    odd_names: int = 0
    """Files whose names need care (spaces, non-ASCII): loaded, but counted for the report."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """How the splits were made (headstart's own split, shots), for the manifest."""

    @property
    def eval_split(self) -> str:
        return "test" if "test" in self.splits else "val" if "val" in self.splits else "train"

    def split(self, name: str) -> Split:
        name = SPLIT_ALIASES.get(name, name)
        if name not in self.splits:
            raise DataError(f"{self.source}: no {name!r} split (has: {', '.join(self.splits)})")
        return self.splits[name]

    def skipped_summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason in self.skipped:
            key = reason.split(" (")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def with_shots(self, shots: int, seed: int = 0) -> "Dataset":
        """Keep `shots` training examples per class, sampled with `random.Random(seed)`.

        The sample depends only on (train split, shots, seed), so every method sees the same
        examples. A class with fewer examples keeps all it has. `shots=0` keeps none (the class
        names remain: what `zeroshot` needs).
        """
        if shots < 0:
            raise DataError(f"--shots must be >= 0, got {shots}")
        train = self.split("train")
        chosen = per_class_sample(train.labels, len(self.classes), shots, seed)
        return replace(self, splits={**self.splits, "train": train.subset(sorted(chosen))},
                       sampling={**self.sampling, "shots": shots, "shots_seed": seed})

    def holdout(self, fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
        """Stratified (train, validation) carved from the training split, for model selection
        when the dataset has no validation split separate from the evaluation split."""
        train = self.split("train")
        return _stratified_split(train, fraction, seed)

    def selection_splits(self, seed: int = 0, mode: str = "auto",
                         min_holdout: int = 100) -> tuple[Split, Split | None]:
        """(train, validation or None) for early stopping; never the evaluation split itself.

        `auto`: the dataset's own `val` when evaluation uses `test`; else a seeded, stratified 10% of
        train when that holds at least `min_holdout` examples; else None -- a smaller holdout is too
        noisy to select on (24 examples: +-4 points of accuracy) and costs a tenth of scarce data, so
        training uses everything and keeps the last epoch. `holdout` forces the 10% carve-out,
        `none` never holds anything out.
        """
        if mode == "none":
            return self.split("train"), None
        if "val" in self.splits and self.eval_split != "val":
            return self.split("train"), self.split("val")
        if mode == "auto" and round(0.1 * len(self.split("train"))) < min_holdout:
            return self.split("train"), None
        return self.holdout(0.1, seed)

def load_dataset(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                 test_fraction: float = 0.2, seed: int = 0, skip_placeholders: bool = True) -> Dataset:
    """Load an image folder or text table(s) as a `Dataset`.

    >>> data = load_dataset("../shared/data/trec")
    >>> data.kind, data.classes[:2], len(data.split("train"))
    ('text', ['ABBR', 'DESC'], 5452)
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"no such file or folder: {path}")
    if root.is_file():
        if root.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{path}: not a table (.csv, .tsv, .jsonl) or image folder")
        texts, labels, skipped = read_table(root, text_column, label_column)
        data = _build("text", {"all": (texts, labels)}, str(root), skipped)
        return _split_all(data, test_fraction, seed)
    tables = {SPLIT_ALIASES[f.stem.lower()]: f for f in sorted(root.iterdir())
              if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES and f.stem.lower() in SPLIT_ALIASES}
    if tables:
        raw, skipped = {}, []
        for split, f in tables.items():
            texts, labels, s = read_table(f, text_column, label_column)
            raw[split] = (texts, labels)
            skipped += s
        if "train" not in raw:
            raise DataError(f"{path}: found {', '.join(f.name for f in tables.values())} but no train table")
        return _build("text", raw, str(root), skipped)
    subdirs = list_class_folders(root)
    if not subdirs:
        raise DataError(f"{path}: no examples (expected <split>/<class>/* images, <class>/* images, or train/test tables)")
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in subdirs if d.name.lower() in SPLIT_ALIASES}
    if split_dirs:
        raw, skipped = {}, []
        for split, d in split_dirs.items():
            paths, labels, s = scan_class_folders(d, skip_placeholders)
            raw[split] = (paths, labels)
            skipped += s
        if "train" not in raw:
            raise DataError(f"{path}: split folders {', '.join(split_dirs)} but no train/")
        return _build("image", raw, str(root), skipped)
    paths, labels, skipped = scan_class_folders(root, skip_placeholders)
    return _split_all(_build("image", {"all": (paths, labels)}, str(root), skipped), test_fraction, seed)


def load_eval_dataset(path: str | Path, **kwargs: Any) -> Dataset:
    """A dataset to evaluate on: a single table, or a folder of class folders without split folders, is
    evaluated whole (its only split, `test`); data with its own splits keeps them (test, else val).

    >>> len(load_eval_dataset("../shared/data/amazon_multidomain/kitchen_test.csv").split("test"))
    400
    """
    data = load_dataset(path, **kwargs)
    if data.sampling.get("split_by") != "headstart":
        return data
    train, test = data.splits["train"], data.splits["test"]
    whole = Split(train.items + test.items, train.labels + test.labels)
    return replace(data, splits={"test": whole}, sampling={"split_by": "none: evaluated whole"})


def _build(kind: str, raw: dict[str, tuple[list, list[str]]], source: str, skipped: list[tuple[str, str]]) -> Dataset:
    train_key = "train" if "train" in raw else "all"
    names = sorted(set(raw[train_key][1]), key=_natural_key)
    if not raw[train_key][0]:
        raise DataError(f"{source}: no examples in the training data" + (f" ({len(skipped)} skipped)" if skipped else ""))
    if len(names) < 2:
        raise DataError(f"{source}: only one class ({names[0]!r}); a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, Split] = {}
    for split, (items, labels) in raw.items():
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise DataError(f"{source}: the {split} split has classes not in train: {', '.join(unknown[:5])}")
        splits[split] = Split(list(items), [index[y] for y in labels])
    odd = sum(1 for item in (raw[k][0] for k in raw) for s in item if kind == "image" and not _plain_name(s))
    return Dataset(kind, names, splits, source, skipped, odd)


def _split_all(data: Dataset, test_fraction: float, seed: int) -> Dataset:
    train, test = _stratified_split(data.splits["all"], test_fraction, seed)
    return replace(data, splits={"train": train, "test": test},
                   sampling={"split_by": "headstart", "test_fraction": test_fraction, "split_seed": seed})


def _stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    keep, held = stratified_indices(split.labels, fraction, seed)
    return split.subset(keep), split.subset(held)


def _natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _plain_name(path: str) -> bool:
    name = Path(path).name
    return name.isascii() and " " not in name
