"""What a user asks of a specialist's versions: its history, a rollback, the difference between two.

Each takes a lineage folder (bundle/lineage.py) or a plain bundle, which is a lineage of one version.

    >>> history("runs/intents")[-1]["current"]
    True
    >>> diff("runs/intents", 1, 2)["labels"]["added"]
    ['refund']
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .format import read_manifest
from .lineage import Lineage

METRICS = ("accuracy", "macro_f1", "loss", "eval_loss")
"""The metrics whose change `diff` reports (each where both versions have it)."""


def history(folder: str | Path) -> list[dict[str, Any]]:
    """One row per version, oldest first, then the rejected attempts: version, whether it is current,
    when it was made, its parent, strategy, scenario, the examples its nights taught, accuracy, guards,
    accepted (and `why` for a rejected attempt).

    folder: a lineage folder or a plain bundle (one row).
    """
    lineage = Lineage.open(folder)
    rows = [_row(v, v["version"] == lineage.current) for v in lineage.entries]
    rows += [{**_row(v, False), "why": v.get("why", "")} for v in lineage.record["rejected"]]
    return rows  # rollbacks are in LINEAGE.json's `events`; the rows keep one shape for tables


def rollback(folder: str | Path, to: int) -> int:
    """Make an earlier (or later) version current again; every version stays on disk, and the next update
    starts from `to`. An unknown version is a BundleError listing the versions.

    folder: a lineage folder.
    to: the version to make current.
    """
    return Lineage.open(folder).rollback(int(to))


def diff(folder: str | Path, a: int, b: int) -> dict[str, Any]:
    """What changed from version `a` to version `b`: labels added and removed, metric changes, the guard
    figures of both, and how `b` was made (strategy, scenario, its nights' data fingerprints).

    folder: a lineage folder (or a plain bundle: only version 1 exists).
    a: the earlier version.
    b: the later version.
    """
    lineage = Lineage.open(folder)
    old, new = lineage.entry(int(a)), lineage.entry(int(b))
    labels_a, labels_b = _labels(lineage.version_folder(old["version"])), _labels(lineage.version_folder(new["version"]))
    metrics = {}
    for key in METRICS:
        va, vb = old.get("metrics", {}).get(key), new.get("metrics", {}).get(key)
        if _number(va) and _number(vb):
            metrics[key] = {"a": va, "b": vb, "change": vb - va}
    return {"a": old["version"], "b": new["version"],
            "labels": {"added": [c for c in labels_b if c not in labels_a],
                       "removed": [c for c in labels_a if c not in labels_b]},
            "metrics": metrics, "guards": {"a": old.get("guards", {}), "b": new.get("guards", {})},
            "strategy": new.get("strategy"), "scenario": new.get("scenario"), "data": new.get("nights", []),
            "parent": new.get("parent")}


def _row(entry: dict[str, Any], current: bool) -> dict[str, Any]:
    nights = entry.get("nights") or []
    examples = sum(n.get("examples", 0) for n in nights if isinstance(n, dict) and _number(n.get("examples")))
    return {"version": entry.get("version"), "current": current, "created": entry.get("created"),
            "parent": entry.get("parent"), "strategy": entry.get("strategy"), "scenario": entry.get("scenario"),
            "examples": examples, "accuracy": entry.get("metrics", {}).get("accuracy"),
            "loss": entry.get("metrics", {}).get("loss"),
            "guards": entry.get("guards", {}), "accepted": entry.get("accepted", True), "note": entry.get("note", "")}


def _labels(bundle: Path) -> list[str]:
    m = read_manifest(bundle)
    if isinstance(m.get("classes"), list):
        return m["classes"]
    return [c for head in m.get("heads", {}).values() for c in head["classes"]]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
