"""Versions of one specialist: a lineage folder whose `current` pointer every load follows.

    runs/intents/
      LINEAGE.json    {"format": "headstart-lineage", "format_version": 1, "current": 3,
                       "versions": [{version, folder, parent, created, bundle_sha256, strategy, scenario,
                                     nights, metrics, guards, accepted, note}, ...],
                       "rejected": [{... "accepted": false, "why": "..."}], "events": [{"rollback": ...}]}
      journal.json    {"files": {"<sha256>": {"path", "version", "versions", "examples"}}}
      v1/ v2/ v3/     complete bundles

Writing a version never touches what the current one reads: the new bundle is staged, renamed to
`v{n}`, the journal written, and LINEAGE.json rewritten LAST (one atomic rename: the pointer switch).
A plain bundle becomes a lineage folder in one `atomic_dir` swap (v1 = its files, hard-linked). A kill
at any moment therefore leaves the previous current version loadable; what it left behind (a `v{n}`
LINEAGE.json does not list, a staging folder of a dead process) is removed by the next writer, and a
version number is never handed out twice (the next one is above every number seen anywhere).

    >>> lineage = Lineage.open("runs/intents")
    >>> staged = lineage.stage()
    >>> specialist.save(staged)                       # + memory/ written into it
    >>> lineage.commit(staged, {"strategy": "replay", "metrics": {...}}, night_files)
    2
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import BundleError
from ..core.storage import atomic_dir, atomic_write_text, recover_interrupted_swap

LINEAGE = "LINEAGE.json"
JOURNAL = "journal.json"
FORMAT = "headstart-lineage"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"  # format.MANIFEST; not imported: format imports this module to resolve folders
_VERSION_FOLDER = re.compile(r"v([1-9][0-9]*)")
_HEADLINE = ("accuracy", "macro_f1", "loss", "eval_loss", "examples", "split")
ENTRY_FIELDS = ("strategy", "scenario", "nights", "metrics", "guards", "note")
"""What a caller's entry may say; commit fills version, folder, parent, created, bundle_sha256, accepted."""


def is_lineage(folder: str | Path) -> bool:
    return (Path(folder) / LINEAGE).is_file()


def resolve_bundle(folder: str | Path) -> Path:
    """The bundle folder to read: a plain bundle (or a `v3/` inside a lineage) is itself, a lineage folder
    is its current version's folder.

    >>> resolve_bundle("runs/intents")
    PosixPath('runs/intents/v3')
    """
    folder = Path(folder)
    recover_interrupted_swap(folder)  # a kill mid-conversion (plain bundle -> lineage) is undone first
    if not is_lineage(folder):
        return folder
    record = read_lineage(folder)
    return folder / _entry(record, record["current"], folder)["folder"]


def read_lineage(folder: Path) -> dict[str, Any]:
    """LINEAGE.json, checked: what loading relies on (the pointer and the version folders) is validated."""
    path = folder / LINEAGE
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable lineage record ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise BundleError(f"{path}: not a headstart lineage record")
    if not isinstance(record.get("format_version"), int) or record["format_version"] > FORMAT_VERSION:
        raise BundleError(f"{path}: lineage format {record.get('format_version')!r} is not one this headstart reads")
    versions = record.get("versions")
    if not isinstance(versions, list) or not versions or not all(isinstance(v, dict) for v in versions):
        raise BundleError(f"{path}: `versions` must be a non-empty list of entries")
    for v in versions:
        n, sub = v.get("version"), v.get("folder")
        # The folder name is checked strictly: a tampered record must not point loading outside the lineage.
        if not isinstance(n, int) or isinstance(n, bool) or not isinstance(sub, str) or sub != f"v{n}":
            raise BundleError(f"{path}: version entry {str(v)[:60]} needs `version` n and `folder` \"v<n>\"")
    _entry(record, record.get("current"), folder)
    record.setdefault("rejected", [])
    record.setdefault("events", [])
    return record


def _entry(record: dict[str, Any], version: Any, folder: Path) -> dict[str, Any]:
    for v in record["versions"]:
        if v["version"] == version and not isinstance(version, bool):
            return v
    listed = ", ".join(str(v["version"]) for v in record["versions"])
    raise BundleError(f"{folder}: no version {version!r} in this lineage (versions: {listed})")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def manifest_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()


class Lineage:
    """One specialist's versions. A plain bundle opens as a one-version lineage; nothing is written
    until its first `commit`."""

    def __init__(self, folder: Path, record: dict[str, Any], journal: dict[str, Any], plain: bool):
        self.folder = folder
        self.record = record
        self.journal = journal
        """{"files": {sha256: {"path", "version", "versions", "examples"}}}: the files earlier nights taught."""
        self.plain = plain
        """True while the folder is still a plain bundle (its one version is the folder itself)."""

    @classmethod
    def open(cls, folder: str | Path) -> "Lineage":
        """A lineage folder, or a plain bundle seen as its version 1; anything else is a BundleError."""
        from .format import read_manifest

        folder = Path(folder).absolute()
        recover_interrupted_swap(folder)
        if is_lineage(folder):
            return cls(folder, read_lineage(folder), _read_journal(folder), plain=False)
        if _VERSION_FOLDER.fullmatch(folder.name) and is_lineage(folder.parent):
            # Seen as a plain bundle it would grow a lineage of its own inside the real one.
            raise BundleError(f"{folder} is {folder.name} of the lineage {folder.parent}: open that folder "
                              f"(rollback to {folder.name[1:]} first to continue from this version)")
        manifest = read_manifest(folder)  # raises the usual BundleError for a folder that is no bundle
        first = {"version": 1, "folder": "v1", "parent": None, "created": manifest.get("created"),
                 "bundle_sha256": manifest_sha256(folder), "strategy": None, "scenario": None,
                 "nights": list(manifest.get("continual", {}).get("nights", [])),
                 "metrics": {k: v for k, v in manifest.get("metrics", {}).items() if k in _HEADLINE},
                 "guards": {}, "accepted": True, "note": "the bundle before its first update"}
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "current": 1, "versions": [first],
                  "rejected": [], "events": []}
        return cls(folder, record, {"files": {}}, plain=True)

    # ---- reading ------------------------------------------------------------------------------
    @property
    def current(self) -> int:
        return self.record["current"]

    @property
    def current_folder(self) -> Path:
        return self.version_folder(self.current)

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The accepted versions, oldest first."""
        return self.record["versions"]

    def entry(self, version: int) -> dict[str, Any]:
        return _entry(self.record, version, self.folder)

    def version_folder(self, version: int) -> Path:
        entry = self.entry(version)
        return self.folder if self.plain else self.folder / entry["folder"]

    def ancestry(self, version: int | None = None) -> list[int]:
        """`version` (default: current) and its parents, newest first: what that version has learned from."""
        chain, seen = [], set()
        n = self.current if version is None else version
        while n is not None and n not in seen:
            seen.add(n)
            chain.append(n)
            n = self.entry(n).get("parent")
        return chain

    def learned(self, sha256: str) -> bool:
        """Whether the current version (or one it descends from) learned the file with this sha256.

        A journal entry of a version that never became current (a kill before the pointer switch), or of a
        version rolled back from, does not count: feeding that night again is a real update.
        """
        row = self.journal["files"].get(sha256)
        if not row:
            return False
        return bool(set(row.get("versions", [row.get("version")])) & set(self.ancestry()))

    # ---- writing ------------------------------------------------------------------------------
    def stage(self, out: str | Path | None = None) -> Path:
        """A fresh, empty staging folder for the next version's bundle (`Specialist.save(path)`, then its
        `memory/`). Inside the lineage folder when it already is one, else beside the folder (a plain
        bundle is swapped whole on its first commit, so its staging cannot live inside it)."""
        target = self._target(out)
        self._sweep(target, orphans=False)  # orphan versions stay until a commit has numbered past them
        if is_lineage(target):
            where, prefix = target, f".stage-{os.getpid()}-"
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            where, prefix = target.parent, f".{target.name}.stage-{os.getpid()}-"
        staged = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
        staged.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a bundle is an ordinary folder
        return staged

    def commit(self, staged: str | Path, entry: dict[str, Any], learned_files: Iterable[dict[str, Any]] = (),
               out: str | Path | None = None) -> int:
        """Make the staged bundle version n (current = n) and journal the files it learned; returns n.

        entry: strategy, scenario, nights (fingerprints), metrics, guards, note.
        learned_files: the night's files, each {"sha256", "path" (or "name"), "examples"}.
        out: write the new version into another folder (the lineage, or the plain bundle as v1, is copied
             there first; an existing bundle or lineage there is replaced); default: this folder.
        """
        from .format import read_manifest

        staged, target = Path(staged), self._target(out)
        if not (staged / MANIFEST).is_file():
            raise BundleError(f"{staged}: nothing staged (save the new version's bundle there first)")
        read_manifest(staged)  # never make current what load would refuse
        n = self._next_version(target)
        new = {"version": n, "folder": f"v{n}", "parent": self.current, "created": now(),
               "bundle_sha256": manifest_sha256(staged),
               **{k: entry.get(k, _EMPTY.get(k)) for k in ENTRY_FIELDS}, "accepted": True}
        record = {**self.record, "current": n, "versions": [*self.entries, new]}
        journal = self._journal_with(learned_files, n, {v["version"] for v in record["versions"]})
        if target == self.folder and not self.plain:
            shutil.move(str(staged), str(target / new["folder"]))  # a rename when staged by `stage()`
            atomic_write_text(target / JOURNAL, _dump(journal))
            atomic_write_text(target / LINEAGE, _dump(record))  # the pointer switch, last
        else:
            with atomic_dir(target) as tmp:  # conversion or copy: the whole folder swapped at once
                self._copy_versions(tmp)
                shutil.move(str(staged), str(tmp / new["folder"]))
                atomic_write_text(tmp / JOURNAL, _dump(journal))
                atomic_write_text(tmp / LINEAGE, _dump(record))
        self.folder, self.record, self.journal, self.plain = target, record, journal, False
        self._sweep(target, orphans=True)  # after the switch: an orphan's number stayed visible until n was listed
        return n

    def reject(self, entry: dict[str, Any], why: str = "") -> None:
        """Record an attempt that was not accepted (no folder kept). A plain bundle records nothing on disk
        (it is not converted for a rejection); the caller's report still says why."""
        row = {"version": None, "folder": None, "parent": self.current, "created": now(), "bundle_sha256": None,
               **{k: entry.get(k, _EMPTY.get(k)) for k in ENTRY_FIELDS}, "accepted": False,
               "why": why or entry.get("why", "")}
        self.record = {**self.record, "rejected": [*self.record["rejected"], row]}
        if not self.plain:
            atomic_write_text(self.folder / LINEAGE, _dump(self.record))

    def rollback(self, to: int) -> int:
        """Make version `to` current again (versions are kept; the next update starts from `to`)."""
        self.entry(to)  # BundleError listing the versions
        if to == self.current or self.plain:
            return to
        event = {"rollback": {"from": self.current, "to": to, "at": now()}}
        self.record = {**self.record, "current": to, "events": [*self.record["events"], event]}
        atomic_write_text(self.folder / LINEAGE, _dump(self.record))
        return to

    # ---- helpers ----------------------------------------------------------------------------------
    def _target(self, out: str | Path | None) -> Path:
        target = self.folder if out is None else Path(out).absolute()
        if target != self.folder and target.exists() and not (is_lineage(target) or (target / MANIFEST).is_file()):
            raise BundleError(f"{target} exists and is neither a bundle nor a lineage folder; choose a new folder")
        return target

    def _next_version(self, target: Path) -> int:
        """Above every number seen: listed, rejected, orphan folders, journal rows (never reused)."""
        seen = [v["version"] for v in self.entries]
        seen += [v["version"] for v in self.record["rejected"] if isinstance(v.get("version"), int)]
        for row in self.journal["files"].values():
            seen += [n for n in row.get("versions", [row.get("version")]) if isinstance(n, int)]
        if target.is_dir():
            seen += [int(m.group(1)) for p in target.iterdir() if (m := _VERSION_FOLDER.fullmatch(p.name))]
        return max(seen) + 1

    def _journal_with(self, files: Iterable[dict[str, Any]], n: int, accepted: set[int]) -> dict[str, Any]:
        rows = {}
        for sha, row in self.journal["files"].items():  # rows of versions never listed are dropped
            kept = [v for v in row.get("versions", [row.get("version")]) if v in accepted]
            if kept:
                rows[sha] = {**row, "versions": kept}
        for f in files:
            sha = f["sha256"]
            old = rows.get(sha, {})
            rows[sha] = {"path": str(f.get("path", f.get("name", old.get("path", "")))), "version": n,
                         "versions": [*old.get("versions", []), n], "examples": f.get("examples")}
        return {"files": rows}

    def _copy_versions(self, tmp: Path) -> None:
        """This lineage's files into `tmp` (hard links where the filesystem allows: bundles are never
        written in place, so a linked file is never changed under the other name)."""
        if self.plain:
            _link_tree(self.folder, tmp / "v1")
            return
        for v in self.entries:
            _link_tree(self.folder / v["folder"], tmp / v["folder"])

    def _sweep(self, target: Path, orphans: bool) -> None:
        """Remove what dead writers left: staging folders, and (`orphans`) `v{n}` folders LINEAGE.json does
        not list. One writer at a time: a second writer's not-yet-listed version would look orphaned."""
        if is_lineage(target) and target == self.folder and not self.plain:
            listed = {v["folder"] for v in read_lineage(target)["versions"]}
            for p in target.iterdir():
                if orphans and _VERSION_FOLDER.fullmatch(p.name) and p.name not in listed:
                    _remove(p)
                elif p.name.startswith(".") and _dead_writer(p.name):
                    _remove(p)
        if target.parent.is_dir():
            mine = re.compile(r"\.+" + re.escape(target.name) + r"\.stage-(\d+)-")
            for p in target.parent.iterdir():
                if (m := mine.match(p.name)) and not _alive(int(m.group(1))):
                    _remove(p)


_EMPTY: dict[str, Any] = {"strategy": None, "scenario": None, "nights": [], "metrics": {}, "guards": {}, "note": ""}
_WRITER = re.compile(r"(?:stage|tmp|old)-(\d+)")


def _dead_writer(name: str) -> bool:
    m = _WRITER.search(name)
    return bool(m) and not _alive(int(m.group(1)))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or we cannot tell: leave its files alone
    return True


def _read_journal(folder: Path) -> dict[str, Any]:
    path = folder / JOURNAL
    if not path.is_file():
        return {"files": {}}
    try:
        journal = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise BundleError(f"{path}: unreadable journal") from None
    if not isinstance(journal, dict) or not isinstance(journal.get("files"), dict):
        raise BundleError(f"{path}: the journal needs a `files` object")
    return journal


def _link_tree(src: Path, dst: Path) -> None:
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy,
                    ignore=lambda d, names: [n for n in names if n.startswith(".")])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
