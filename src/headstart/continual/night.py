"""One night's new data: read from the files a user drops, minus what was already learned, and the way
back from what the memory kept (refs, raw) to examples a model can read.

A night is any mix of tables (`text,label` CSV/TSV/JSONL, or texts alone with --unlabelled) and image
folders (`<class>/*`, or loose images with --unlabelled). Every example is keyed by the sha256 of its
content, so the journal can tell what was learned before, whatever the file is called now.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import DataError
from ..core.storage import sha256_file
from ..data.sampling import stratified_indices
from .memory import GUARD_CAP, ExampleSet, raw_folder


@dataclass
class NightData:
    kind: str
    items: list[Any]
    """Image paths or texts, in file order."""
    labels: list[str] | None
    """Label names; None for an unlabelled night."""
    keys: list[str]
    sources: list[str]
    """The file (image) or table (text) each example came from: what store `refs` keeps."""
    files: list[dict[str, Any]] = field(default_factory=list)
    """{name, sha256, examples} per path given: the night's fingerprint (never content)."""
    skipped: int = 0
    already_learned: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for y in self.labels or []:
            counts[y] = counts.get(y, 0) + 1
        return {"files": self.files, "examples": len(self), "labelled": self.labels is not None,
                "labels": counts, "skipped": self.skipped, "already_learned": self.already_learned}

    def as_examples(self, idx: list[int] | None = None, store: str = "refs") -> ExampleSet:
        """Examples `idx` as the store keeps them (`features` are added by the learner, which has the base)."""
        idx = list(range(len(self))) if idx is None else idx
        labels = [self.labels[i] for i in idx] if self.labels is not None else ["?"] * len(idx)
        keys = [self.keys[i] for i in idx]
        if store == "refs":
            return ExampleSet(labels, keys, refs=[self.sources[i] for i in idx])
        if store == "raw":
            return ExampleSet(labels, keys, raw=[str(self.items[i]) for i in idx])
        return ExampleSet(labels, keys)

    def split_guard(self, share: float, seed: int) -> tuple[list[int], list[int]]:
        """(training indices, held-back guard indices): a stratified `share`, at most GUARD_CAP, never a
        class's only examples; an unlabelled night holds nothing back (nothing to measure it with)."""
        if self.labels is None or share <= 0 or len(self) < 10:
            return list(range(len(self))), []
        names = sorted(set(self.labels))
        codes = [names.index(y) for y in self.labels]
        keep, held = stratified_indices(codes, share, seed)
        if len(held) > GUARD_CAP:
            rng = random.Random(seed)
            extra = rng.sample(held, len(held) - GUARD_CAP)
            held = sorted(set(held) - set(extra))
            keep = sorted(keep + extra)
        return keep, held


def read_night(paths: list[Path], *, kind: str, unlabelled: bool, learned: Callable[[str], bool],
               text_column: str = "text", label_column: str = "label", skip_placeholders: bool = True) -> NightData:
    """The new examples in `paths` (files and folders), skipping those whose content was learned before."""
    from ..data.target import _loose_items
    from ..engine.features import item_key

    night = NightData(kind, [], None if unlabelled else [], [], [])
    for path in [p for given in paths for p in _expand(given, kind)]:
        if unlabelled:
            items, skipped = _loose_items(path, kind, text_column, skip_placeholders)
            labels = None
        else:
            items, labels, skipped = _labelled(path, kind, text_column, label_column, skip_placeholders)
        fresh = 0
        for i, item in enumerate(items):
            key = item_key(item, is_file=kind == "image")
            if learned(key) or key in night.keys:
                night.already_learned += 1
                continue
            fresh += 1
            night.items.append(item)
            night.keys.append(key)
            night.sources.append(str(Path(item).resolve()) if kind == "image" else str(path.resolve()))
            if labels is not None:
                night.labels.append(labels[i])
        night.skipped += skipped
        night.files.append({"name": path.name, "sha256": _content_sha256(path), "examples": len(items), "new": fresh})
    return night


def _labelled(path: Path, kind: str, text_column: str, label_column: str,
              skip_placeholders: bool) -> tuple[list, list[str], int]:
    """(items, label names, skipped) of a table or an image folder (`<class>/*`, or split folders of them).
    One class is fine: a night may bring photos of a single label."""
    from ..data.images import list_class_folders, scan_class_folders
    from ..data.tables import read_table

    hint = " (a night without labels needs --unlabelled)"
    if path.is_file():
        if kind != "text":
            raise DataError(f"{path}: a table, but the specialist classifies images (give an image folder)")
        try:
            texts, labels, skipped = read_table(path, text_column, label_column)
        except DataError as e:
            raise DataError(f"{e}{hint}") from None
        return texts, labels, len(skipped)
    if kind != "image":
        raise DataError(f"{path}: a folder of images, but the specialist classifies texts")
    folders = list_class_folders(path)
    splits = [d for d in folders if d.name.lower() in ("train", "val", "valid", "validation", "dev", "test")]
    items, labels, skipped = [], [], 0
    for root in splits or [path]:
        found, names, bad = scan_class_folders(root, skip_placeholders)
        items, labels, skipped = items + list(found), labels + list(names), skipped + len(bad)
    if not items:
        raise DataError(f"{path}: no labelled images (expected <class>/* folders){hint}")
    return items, labels, skipped


def _expand(path: Path, kind: str) -> list[Path]:
    """The units a path holds: a text folder (an inbox) is each of its tables, whatever they are called;
    an image folder is one unit (its class folders, or loose images)."""
    from ..data.tables import TABLE_SUFFIXES

    if not path.exists():
        raise DataError(f"no such file or folder: {path}")
    if path.is_dir() and kind == "text":
        tables = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES
                        and not f.name.startswith("."))
        if not tables:
            raise DataError(f"{path}: no tables (.csv, .tsv, .jsonl) in this folder")
        return tables
    return [path]


def resolve_examples(examples: ExampleSet, kind: str, memory_folder: Path | None,
                     text_column: str = "text", label_column: str = "label") -> tuple[list[Any], list[str], int]:
    """(items, labels, dropped) a model can read from what store `refs` or `raw` kept. An example whose
    file is gone, or whose content no longer has the recorded sha256, is dropped and counted."""
    from ..engine.features import item_key

    if examples.raw is not None:
        if kind == "text":
            return list(examples.raw), list(examples.labels), 0
        items, labels, dropped = [], [], 0
        for name, y in zip(examples.raw, examples.labels):
            path = Path(name) if Path(name).is_absolute() or memory_folder is None else raw_folder(memory_folder) / name
            if path.is_file():
                items.append(str(path))
                labels.append(y)
            else:
                dropped += 1
        return items, labels, dropped
    if examples.refs is None:
        return [], [], len(examples)
    texts_of: dict[str, dict[str, str]] = {}
    items, labels, dropped = [], [], 0
    for ref, key, y in zip(examples.refs, examples.keys, examples.labels):
        if kind == "image":
            ok = Path(ref).is_file() and item_key(ref, is_file=True) == key
            item = ref
        else:
            if ref not in texts_of:
                texts_of[ref] = _texts_by_key(Path(ref), text_column, label_column)
            item = texts_of[ref].get(key)
            ok = item is not None
        if ok:
            items.append(item)
            labels.append(y)
        else:
            dropped += 1
    return items, labels, dropped


def _texts_by_key(path: Path, text_column: str, label_column: str) -> dict[str, str]:
    from ..data import load_eval_dataset
    from ..data.target import _loose_items
    from ..engine.features import item_key

    if not path.exists():
        return {}
    try:
        data = load_eval_dataset(path, text_column=text_column, label_column=label_column)
        texts = [x for s in data.splits.values() for x in s.items]
    except DataError:  # an unlabelled table
        texts, _ = _loose_items(path, "text", text_column, True)
    return {item_key(t, is_file=False): t for t in texts}


def _content_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file sha256) list."""
    import hashlib

    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
