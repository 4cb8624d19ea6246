"""What a classifier's `predict` accepts, checked once for the PyTorch and the ONNX specialist (torch-free:
the `.onnx` path must not import it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.errors import DataError


def prediction_inputs(xs: Sequence[Any] | str | Path, kind: str) -> list[Any]:
    """One input or a list -> a list; paths as strings; a missing image file refused by name."""
    if isinstance(xs, (str, Path)):
        xs = [xs]
    xs = [str(x) if isinstance(x, Path) else x for x in xs]
    if kind == "image":
        for x in xs:
            if isinstance(x, str) and not Path(x).is_file():
                raise DataError(f"no such image file: {x}")
    return xs


def evaluation_split(data, split: str | None, classes: list[str], columns: dict[str, str]):
    """The labelled split a classifier is evaluated on: (dataset, split name, items, labels as indices into
    `classes`). A single table file, or class folders without splits, is evaluated whole (not split 80/20 as a
    training file would be); labels the specialist never saw are refused by name."""
    from ..core.errors import LabelError
    from ..data import Dataset, load_dataset, load_eval_dataset

    if not isinstance(data, Dataset):
        data = load_dataset(data, **columns) if split else load_eval_dataset(data, **columns)
    split = split or data.eval_split
    part = data.split(split)
    unseen = sorted({data.classes[y] for y in part.labels} - set(classes))
    if unseen:
        raise LabelError(f"{data.source} ({split}) has labels this specialist never saw: {', '.join(unseen[:8])} "
                         f"(it knows: {', '.join(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    return data, split, part.items, [index[data.classes[y]] for y in part.labels]
