"""Text tables: CSV, TSV, JSONL with configurable text and label columns."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..core.errors import DataError

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long reviews exceed csv's 128 KB default


def read_table(path: Path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Return (texts, labels, skipped (row ref, reason)).

    Rows with an empty text or label are skipped and counted, not fatal: one bad line in a
    50,000-row export should not cost the user the run.
    """
    rows, columns = _rows(path)
    for col in (text_column, label_column):
        if columns is not None and col not in columns:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(columns)}); pass --text-column/--label-column")
    texts: list[str] = []
    labels: list[str] = []
    skipped: list[tuple[str, str]] = []
    for i, row in enumerate(rows, start=1):
        if row is None:
            skipped.append((f"{path.name}:{i}", "unparseable row"))
            continue
        text, label = row.get(text_column), row.get(label_column)
        if text is None or str(text).strip() == "":
            skipped.append((f"{path.name}:{i}", "empty text"))
            continue
        if label is None or str(label).strip() == "":
            skipped.append((f"{path.name}:{i}", "empty label"))
            continue
        texts.append(str(text))
        labels.append(str(label).strip())
    return texts, labels, skipped


def _rows(path: Path) -> tuple[list[dict | None], list[str] | None]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            rows: list[dict | None] = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        rows.append(obj if isinstance(obj, dict) else None)
                    except json.JSONDecodeError:
                        rows.append(None)
            return rows, None
        delimiter = "\t" if suffix == ".tsv" else ","
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            return list(reader), list(reader.fieldnames or [])
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
