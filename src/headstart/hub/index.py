"""The hub's `index.json`: one entry per bundle folder, rebuilt from the bundles' manifests.

    hub/
      index.json       {"format": "headstart-hub", "format_version": 1, "entries": [...], "skipped": [...]}
      trec-ft/         a complete bundle (manifest.json, trained.safetensors, README.md, ...)
      ants/

An entry: name, path (relative to the hub), kind, task (Hugging Face pipeline words), base name +
weights sha256, method, labels, headline metrics, created, and files {relpath: {sha256, size}}.
A folder without a valid manifest is listed under `skipped` with the reason, never a crash.

File hashes are recorded when a bundle is added and carried over by later rebuilds while its manifest
is unchanged, so `pull` detects a file altered in the hub after it was added (a rebuild with
`rehash=True` accepts what is on disk now).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

from ..bundle.commands import pipeline_task
from ..bundle.format import MANIFEST, read_manifest
from ..core.errors import HeadstartError
from ..core.storage import atomic_write_text, recover_interrupted_swap

INDEX = "index.json"
FORMAT = "headstart-hub"
FORMAT_VERSION = 1
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A specialist id: the hub's folder name and the server's id (no separators, so no path traversal)."""
_SWAP_LEFTOVER = re.compile(r"\.(.+)\.(?:old|tmp)-\d+-.*")
HEADLINE = ("accuracy", "macro_f1", "eval_loss", "eval_perplexity", "reward_accuracy", "examples", "split")


class HubError(HeadstartError):
    """A hub folder, entry or transfer that cannot be used as asked (one line, no traceback)."""


def check_name(name: str, what: str = "name") -> str:
    """`name` if it is a valid specialist id; else a one-line HubError (this is what keeps a name from
    pointing outside the hub)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise HubError(f"{what} {str(name)[:60]!r} is not a valid specialist name: use letters, digits, "
                       "'.', '_' or '-', starting with a letter or digit (at most 100 characters)")
    return name


def hub_folder(hub: str | Path, create: bool = False) -> Path:
    """The hub folder, checked (created when `create`)."""
    if hub is None or str(hub) == "":
        raise HubError("no hub folder given (--hub DIR)")
    folder = Path(hub).expanduser()
    if folder.exists() and not folder.is_dir():
        raise HubError(f"{folder}: not a folder")
    if not folder.exists():
        if not create:
            raise HubError(f"{folder}: no such hub folder")
        folder.mkdir(parents=True)
    return folder


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, always read from disk (never a memo: it is what `pull` verifies)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every file of a bundle, sorted; a symlink is refused (a hub holds
    plain files only, so nothing copied in or out can point elsewhere)."""
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise HubError(f"{path}: a symbolic link; a hub bundle holds plain files only")
        if path.is_file():
            yield path.relative_to(folder).as_posix(), path


def entry_of(folder: Path, name: str, files: dict[str, dict] | None = None) -> dict[str, Any]:
    """The index entry of the bundle in `folder` (hashing its files unless `files` is given)."""
    m = read_manifest(folder)
    labels: list[str] = list(m.get("classes") or [])
    for head in m.get("heads", {}).values():
        labels += [c for c in head["classes"] if c not in labels]
    metrics = m.get("metrics", {})
    if files is None:
        files = {rel: {"sha256": sha256_of(p), "size": p.stat().st_size} for rel, p in bundle_files(folder)}
    return {
        "name": name, "path": name, "kind": m["kind"], "task": pipeline_task(m),
        "training_task": m.get("task", "classify"),
        "base": {"name": m["base"]["name"], "kind": m["base"]["kind"], "sha256": m["base"]["sha256"]},
        "method": m["method"]["name"], "labels": labels,
        "heads": {h: v["classes"] for h, v in m.get("heads", {}).items()},
        "metrics": {k: metrics[k] for k in HEADLINE if k in metrics},
        "created": m.get("created"), "headstart_version": m.get("versions", {}).get("headstart"),
        "manifest_sha256": sha256_of(folder / MANIFEST), "files": files,
        "size": sum(f["size"] for f in files.values()),
    }


def rebuild_index(hub: str | Path, rehash: bool = False) -> dict[str, Any]:
    """Rebuild a hub's index.json from its bundles' manifests, naming the folders it skips. Returns the index.

    hub: the hub folder.
    rehash: record every file's sha256 as it is on disk now (default: keep the hashes recorded when
    each bundle was added, while its manifest is unchanged, so that `pull` still detects an altered file).

    A folder without a valid manifest (or with a name that is not a valid id) is skipped and listed
    under `skipped` with the reason.
    """
    return rebuild(hub_folder(hub, create=True), rehash=rehash)


def rebuild(folder: Path, rehash: bool = False, recorded: dict[str, dict] | None = None) -> dict[str, Any]:
    """`rebuild_index`, where `recorded` gives the file hashes of bundles just copied in (hashed as copied)."""
    previous = {} if rehash else {e["name"]: e for e in _read_raw(folder).get("entries", [])}
    entries, skipped = [], []
    for name in sorted(_folders(folder)):
        child = folder / name
        try:
            check_name(name, "folder")
            old = previous.get(name)
            # Same manifest, same bundle: its recorded hashes stand (a file changed, lost or added since is
            # caught by `pull`, not silently re-recorded); a new manifest is a new bundle, hashed afresh.
            same = old is not None and old.get("manifest_sha256") == sha256_of(child / MANIFEST)
            files = (recorded or {}).get(name) or (old["files"] if same else None)
            entries.append(entry_of(child, name, files))
        except (HeadstartError, OSError) as e:
            skipped.append({"folder": name, "why": " ".join(str(e).split())[:300]})
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, "entries": entries, "skipped": skipped}
    try:
        atomic_write_text(folder / INDEX, json.dumps(index, indent=1))
    except OSError:
        pass  # a read-only hub (a shared mount) is still listed and searched from the index built here
    return index


def read_index(hub: str | Path) -> dict[str, Any]:
    """The hub's index; rebuilt first when it is missing, unreadable, or names other folders than the hub
    holds (a bundle copied in or deleted by hand)."""
    folder = hub_folder(hub)
    index = _read_raw(folder)
    listed = {e["name"] for e in index.get("entries", [])} | {s.get("folder") for s in index.get("skipped", [])}
    return index if "entries" in index and listed == _folders(folder) else rebuild(folder)


def find_entry(hub: str | Path, name: str) -> dict[str, Any]:
    """The index entry called `name`; a HubError naming the hub's entries when there is none."""
    check_name(name)
    entries = read_index(hub)["entries"]
    for e in entries:
        if e["name"] == name:
            return e
    known = ", ".join(e["name"] for e in entries[:20]) or "none"
    raise HubError(f"{hub}: no specialist {name!r} in this hub (entries: {known})")


def _folders(folder: Path) -> set[str]:
    """The hub's entry folders: every folder but hidden ones, after undoing what a kill mid-`add --replace`
    or mid-`remove` left (a swap leftover `.<name>.old-<pid>-*` is a whole previous version: core.storage)."""
    for leftover in {m.group(1) for c in folder.iterdir() if (m := _SWAP_LEFTOVER.fullmatch(c.name))}:
        recover_interrupted_swap(folder / leftover)
    return {c.name for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")}


def _read_raw(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or torn: rebuilt from the bundles, which are the truth
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("entries"), list) \
            or not isinstance(index.get("skipped", []), list) \
            or not all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("files"), dict)
                       for e in index["entries"]) or not all(isinstance(s, dict) for s in index.get("skipped", [])):
        return {}
    return index


__all__ = ["HubError", "INDEX", "check_name", "entry_of", "find_entry", "read_index", "rebuild_index",
           "sha256_of"]
