"""Target-domain data for adaptation: the examples adaptation may use, and what it is measured on.

    target = load_target("../shared/data/amazon_multidomain/kitchen_train.csv", classes=source.classes,
                         kind="text", test="../shared/data/amazon_multidomain/kitchen_test.csv")
    target.pool      # every kitchen_train review: the (unlabelled) adaptation data
    target.test      # kitchen_test.csv, labelled: evaluation only

Without `test`, a labelled target is split as `load_dataset` splits it (its own test/val split, or a
seeded 80/20): the pool is its train part and the held-out part is the test. A target without labels
(`unlabelled=True`: a table with no label column, or a folder of loose images) is a pool only.
Labels of the pool, when the data has them, are kept for `target-oracle`; adaptation methods never
see them (the API strips them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DataError
from .dataset import Dataset, Split, load_dataset, load_eval_dataset
from .images import IMAGE_SUFFIXES, check_image
from .tables import TABLE_SUFFIXES, _rows

UNLABELLED = -1


@dataclass
class TargetData:
    pool: Split
    """Examples adaptation may use; labels index the *source* classes, -1 when unknown."""
    test: Dataset | None
    """Labelled target evaluation data (classes = the source's), or None."""
    source: str
    skipped: int = 0

    @property
    def labelled(self) -> bool:
        return bool(len(self.pool)) and all(y != UNLABELLED for y in self.pool.labels)

    def unlabelled_pool(self) -> Split:
        """The pool with its labels hidden: what adaptation methods receive."""
        return Split(list(self.pool.items), [UNLABELLED] * len(self.pool))


def load_target(path: str | Path, *, classes: list[str], kind: str, test: str | Path | None = None,
                unlabelled: bool = False, text_column: str = "text", label_column: str = "label", seed: int = 0,
                skip_placeholders: bool = True) -> TargetData:
    """Load target-domain data against the source's `classes` (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"no such target file or folder: {path}")
    cols = {"text_column": text_column, "label_column": label_column}
    test_data = _relabel(load_eval_dataset(test, skip_placeholders=skip_placeholders, **cols), classes) if test else None
    try:
        data = load_dataset(root, seed=seed, skip_placeholders=skip_placeholders, **cols)
    except DataError as e:
        if unlabelled:  # no label column / no class folders: the texts or images alone
            items, skipped = _loose_items(root, kind, text_column, skip_placeholders)
            return TargetData(Split(items, [UNLABELLED] * len(items)), test_data, str(root), skipped)
        raise DataError(f"target: {e} (an unlabelled target needs --target-unlabelled)") from None
    if data.kind != kind:
        raise DataError(f"the target {root} holds {data.kind} data but the source holds {kind} data")
    data = _relabel(data, classes)
    if test_data is not None:  # a separate test set: every target example is adaptation data
        pool = Split([x for s in data.splits.values() for x in s.items], [y for s in data.splits.values() for y in s.labels])
    else:
        pool = data.split("train")
        held = data.eval_split
        test_data = Dataset(kind, classes, {"test": data.split(held)}, f"{root} ({held})") if held != "train" else None
    return TargetData(pool, test_data, str(root), len(data.skipped))


def _relabel(data: Dataset, classes: list[str]) -> Dataset:
    """Re-index `data`'s labels into the source's class list; a class the source lacks is an error."""
    unknown = sorted(set(data.classes) - set(classes))
    if unknown:
        raise DataError(f"{data.source} has classes the source does not: {', '.join(unknown[:8])} "
                        f"(adaptation keeps the source's label set: {', '.join(classes[:8])})")
    index = {c: i for i, c in enumerate(classes)}
    splits = {k: Split(s.items, [index[data.classes[y]] for y in s.labels]) for k, s in data.splits.items()}
    return Dataset(data.kind, list(classes), splits, data.source, data.skipped, data.odd_names, data.sampling)


def _loose_items(root: Path, kind: str, text_column: str, skip_placeholders: bool) -> tuple[list, int]:
    """Texts of a table without labels, or every image under a folder; unusable ones are counted."""
    if root.is_file():
        if root.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{root}: not a table (.csv, .tsv, .jsonl)")
        rows, columns = _rows(root)
        if columns is not None and text_column not in columns:
            raise DataError(f"{root}: no column {text_column!r} (columns: {', '.join(columns)}); pass --text-column")
        texts = [str(r[text_column]) for r in rows if r and str(r.get(text_column) or "").strip()]
        return texts, len(rows) - len(texts)
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    good = [str(f) for f in files if check_image(f, skip_placeholders) is None]
    if not good:
        raise DataError(f"{root}: no usable images in the target folder")
    return good, len(files) - len(good)
