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
