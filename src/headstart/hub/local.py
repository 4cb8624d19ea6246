"""The local hub: a folder of bundles with an index, to add to, list, search, show, pull from and remove.

    >>> from headstart import hub
    >>> hub.add("runs/trec-ft", "hub/")["task"]
    'text-classification'
    >>> [e["name"] for e in hub.search("hub/", task="text-classification", metric="accuracy", min_value=0.9)]
    ['trec-ft']
    >>> hub.pull("trec-ft", "hub/", "elsewhere/trec-ft")     # every file's sha256 checked against the index
    PosixPath('elsewhere/trec-ft')

Every write is atomic (core.storage.atomic_dir): a bundle appears in the hub, or at `pull`'s `out`,
whole and verified, or not at all.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..bundle.format import read_manifest
from ..bundle.lineage import resolve_bundle
from ..core.errors import ConfigError
from ..core.storage import atomic_dir, discard_dir, recover_interrupted_swap
from .index import HubError, bundle_files, check_name, entry_of, find_entry, hub_folder, read_index, rebuild

TASKS = ("text-classification", "image-classification", "text-generation", "feature-extraction")
"""Hugging Face pipeline tasks a hub entry answers (a text classifier's base also gives embeddings)."""
CARD = "README.md"


def add(bundle: str | Path, hub: str | Path, name: str | None = None, replace: bool = False) -> dict[str, Any]:
    """Copy a bundle into a hub as `<hub>/<name>/` and index it. Returns its index entry.

    bundle: the bundle folder (a lineage folder adds its current version).
    hub: the hub folder (created when missing).
    name: the specialist's name in the hub (default: the bundle folder's name).
    replace: replace an entry of the same name (default: refuse).

    The manifest is validated before anything is copied; every file is hashed as it is copied.
    """
    given = Path(bundle)
    if not given.is_dir():
        raise HubError(f"{given}: no such bundle folder")
    source = resolve_bundle(given)
    read_manifest(source)  # a damaged or foreign folder is refused before anything is copied
    name = check_name(given.resolve().name if name is None else name)
    folder = hub_folder(hub, create=True)
    target = folder / name
    recover_interrupted_swap(target)
    if target.exists() and not replace:
        raise HubError(f"{folder}: {name!r} is already in this hub (pass --replace to overwrite it, or --name)")
    if target.resolve() == source.resolve() or folder.resolve().is_relative_to(source.resolve()):
        raise HubError(f"{source}: cannot add a bundle to a hub inside itself, or over itself")
    with atomic_dir(target) as tmp:
        files = {rel: copy_hashed(path, tmp / rel) for rel, path in bundle_files(source)}
        entry_of(tmp, name, files)  # the copy reads as a bundle before it is swapped in
    index = rebuild(folder, recorded={name: files})
    entry = next(e for e in index["entries"] if e["name"] == name)
    return {**_public(entry), "hub": str(folder), "skipped": len(index["skipped"])}


def list_entries(hub: str | Path) -> list[dict[str, Any]]:
    """List the specialists in a hub: name, task, kind, base, method, labels, headline metrics.

    hub: the hub folder.
    """
    return [_public(e) for e in read_index(hub)["entries"]]


def search(hub: str | Path, task: str | None = None, base: str | None = None, label: str | None = None,
           metric: str | None = None, min_value: float | None = None, text: str | None = None) -> list[dict[str, Any]]:
    """Find the hub's specialists that match every filter given (best first when `metric` is given).

    hub: the hub folder.
    task: a Hugging Face pipeline task: text-classification, image-classification, text-generation, or
    feature-extraction (text classifiers, whose base gives embeddings).
    base: the base's name, or a prefix of its weights' sha256.
    label: a label the specialist predicts (case-insensitive).
    metric: a headline metric the specialist reports (accuracy, macro_f1, eval_loss, ...); results are sorted by it.
    min_value: the least value of `metric` (with `metric`).
    text: words found in the name, base, method, labels or model card (case-insensitive).
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; the hub knows {', '.join(TASKS)}")
    if min_value is not None and metric is None:
        raise ConfigError("min_value needs a metric (e.g. --metric accuracy --min-value 0.9)")
    folder = hub_folder(hub)
    found = [e for e in read_index(folder)["entries"]
             if _matches(e, folder, task, base, label, metric, min_value, text)]
    if metric is not None:
        found.sort(key=lambda e: e["metrics"][metric], reverse=not metric.endswith(("loss", "perplexity")))
    return [_public(e) for e in found]


def show(name: str, hub: str | Path) -> dict[str, Any]:
    """What a hub specialist is: manifest facts, metrics, model card, and its files with their sha256.

    name: the specialist's name in the hub.
    hub: the hub folder.
    """
    entry = find_entry(hub, name)
    folder = hub_folder(hub) / name
    m = read_manifest(folder)
    card = folder / CARD
    return {**entry, "path": str(folder.resolve()), "metrics": m.get("metrics", {}),
            "method_config": m["method"]["config"], "data": m.get("data", {}),
            "base": {**entry["base"], "source": m["base"].get("source"), "license": m["base"].get("license")},
            "card": card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""}


def pull(name: str, hub: str | Path | None, out: str | Path, replace: bool = False) -> Path:
    """Copy a specialist out of a hub (or `hf:owner/repo`), checking every file's sha256. Returns the folder.

    name: the specialist's name in the hub, or `hf:owner/repo` for a Hugging Face Hub repository.
    hub: the hub folder (not needed for `hf:` names).
    out: the bundle folder to write.
    replace: overwrite `out` when it exists (default: refuse).

    A file that differs from what the index recorded refuses the pull, and nothing is left at `out`.
    """
    if name.startswith("hf:"):
        from .remote import pull_remote

        return pull_remote(name, out, replace=replace)
    entry = find_entry(hub, name)
    source = hub_folder(hub) / name
    target = _out_folder(out, replace)
    with atomic_dir(target) as tmp:
        copy_verified(source, entry["files"], tmp, f"{name} in {hub}")
        read_manifest(tmp)
    return target


def remove(name: str, hub: str | Path) -> dict[str, Any]:
    """Remove a specialist from a hub. Returns the entry it had.

    name: the specialist's name in the hub.
    hub: the hub folder.
    """
    entry = find_entry(hub, name)
    folder = hub_folder(hub)
    # Renamed aside first (one atomic step) so that a kill mid-delete never leaves half a bundle indexed;
    # a `.<name>.tmp-<pid>-*` leftover of a dead process is swept by core.storage's recovery.
    trash = folder / f".{name}.tmp-{os.getpid()}-removed"
    os.replace(folder / name, trash)
    rebuild(folder)
    discard_dir(trash)
    return _public(entry)


def entries(hub: str | Path) -> list[dict[str, Any]]:
    """The hub's specialists for a server: name, absolute bundle path, task, kind, base, method, labels.

    hub: the hub folder.
    """
    folder = hub_folder(hub).resolve()
    return [{**_public(e), "path": str(folder / e["name"])} for e in read_index(folder)["entries"]]


# ---- copying --------------------------------------------------------------------------------------

def copy_hashed(source: Path, dest: Path, chunk: int = 1 << 20) -> dict[str, Any]:
    """Copy one file, hashing the bytes as they are written; return {sha256, size}."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(dest, "wb") as dst:
        while block := src.read(chunk):
            h.update(block)
            dst.write(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}


def copy_verified(source: Path, files: dict[str, dict], dest: Path, what: str) -> None:
    """Copy the listed files of `source` into `dest`; a missing or altered file is a one-line HubError."""
    for rel, expected in sorted(files.items()):
        check_relative(rel, what)
        path = source / rel
        if path.is_symlink() or not path.is_file():
            raise HubError(f"{what}: {rel} is missing; the hub copy is incomplete (pull refused)")
        got = copy_hashed(path, dest / rel)
        if got["sha256"] != expected.get("sha256"):
            raise HubError(f"{what}: {rel} has sha256 {got['sha256'][:12]}..., the index recorded "
                           f"{str(expected.get('sha256'))[:12]}...: the file was altered; pull refused")


def check_relative(rel: str, what: str) -> str:
    """A file path inside a bundle (no absolute path, no `..`): an index is read, never trusted to point out."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or ":" in rel or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"{what}: the file list names {rel[:80]!r}, a path outside the bundle; refused")
    return rel


def _out_folder(out: str | Path, replace: bool) -> Path:
    target = Path(out)
    recover_interrupted_swap(target)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())) and not replace:
        raise HubError(f"{target}: already exists (pass --replace to overwrite it, or choose another --out)")
    return target


def _matches(e: dict, folder: Path, task: str | None, base: str | None, label: str | None, metric: str | None,
             min_value: float | None, text: str | None) -> bool:
    if task == "feature-extraction":
        if e["task"] != "text-classification":
            return False
    elif task is not None and e["task"] != task:
        return False
    if base is not None and base.lower() != e["base"]["name"].lower() and not (
            len(base) >= 6 and e["base"]["sha256"].startswith(base.lower())):
        return False
    if label is not None and label.lower() not in {x.lower() for x in e["labels"]}:
        return False
    value = e["metrics"].get(metric) if metric is not None else None
    if metric is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return False
    if min_value is not None and value < min_value:
        return False
    return text is None or _contains(e, folder, text.lower())


def _contains(e: dict, folder: Path, text: str) -> bool:
    haystack = " ".join([e["name"], e["base"]["name"], e["method"], e["task"], *e["labels"]]).lower()
    if all(word in haystack for word in text.split()):
        return True
    card = folder / e["name"] / CARD
    card_text = (haystack + " " + card.read_text(encoding="utf-8", errors="replace").lower()) if card.is_file() else ""
    return all(word in card_text for word in text.split())


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry for listings: without the per-file hashes (`show` has them)."""
    return {k: v for k, v in entry.items() if k != "files"}
