"""The manifest's schema: checked on every load, so a tampered or damaged manifest is one clear line.

Version 2 (written now) names what a bundle holds over its one base:

    "kind": "classifier" | "generator"
    "heads": {"default": {"classes": [...]}, ...}       classifier heads (tensors: `head.*` in
                                                         trained.safetensors for "default", or the
                                                         file a head names under "weights")
    "adapters": {"default": "adapter", ...}              PEFT adapter folders, relative to the bundle

Version 1 bundles (no kind / heads / adapters) are upgraded in memory by `upgrade_v1`; the file
on disk is never rewritten. The schema is hand-written (a few dozen lines) rather than a
jsonschema document: the checks are few and the messages name the field in plain words.
"""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from ..core.errors import BundleError

KINDS = ("classifier", "generator")
GENERATIVE_TASKS = ("sft", "dpo")
DEFAULT = "default"
"""The name of the head / adapter a bundle written by `fit` holds."""
HEADS_DIR = "heads"
"""Where named heads' weights live in a bundle (one safetensors file per head)."""

# field -> (type(s), required). Only what loading relies on is required; the rest is descriptive.
_TOP: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "format": (str, True), "format_version": (int, True), "kind": (str, True),
    "base": (dict, True), "method": (dict, True), "task": (str, False),
    "classes": (list, False), "heads": (dict, False), "adapters": (dict, False), "files": (dict, False),
    "preprocessing": (dict, False), "metrics": (dict, False), "data": (dict, False), "details": (dict, False),
    "history": (list, False), "training": (dict, False), "seed": (int, False), "bundle_name": (str, False),
    "parent": (dict, False), "continual": (dict, False),
    "versions": (dict, False), "created": (str, False), "plots": (dict, False),
}
_BASE = {"name": (str, True), "sha256": (str, True), "kind": (str, True), "params": ((int, float), False),
         "source": (str, False), "preprocessing": (dict, False), "architecture": (str, False),
         "license": ((str, type(None)), False)}
_METHOD = {"name": (str, True), "config": (dict, True)}


def upgrade_v1(manifest: dict[str, Any], has_adapter_folder: bool) -> dict[str, Any]:
    """A version-1 manifest in the version-2 shape (kind, heads, adapters), in memory."""
    m = dict(manifest)
    if m.get("format_version") != 1:
        return m
    m["kind"] = "generator" if m.get("task") in GENERATIVE_TASKS else "classifier"
    if m["kind"] == "classifier" and isinstance(m.get("classes"), list):
        m.setdefault("heads", {DEFAULT: {"classes": m["classes"]}})
    if has_adapter_folder:  # v1 wrote PEFT adapters to one fixed folder
        m.setdefault("adapters", {DEFAULT: "adapter"})
    return m


def validate(m: dict[str, Any], where: str) -> dict[str, Any]:
    """Raise BundleError naming the first field that is missing or of the wrong type; return `m`."""
    if not isinstance(m, dict):
        raise BundleError(f"{where}: the manifest is not a JSON object")
    _fields(m, _TOP, where, "")
    _fields(m["base"], _BASE, where, "base.")
    _fields(m["method"], _METHOD, where, "method.")
    if m["kind"] not in KINDS:
        raise BundleError(f"{where}: unknown bundle kind {_short(m['kind'])} (known: {', '.join(KINDS)})")
    for name, head in m.get("heads", {}).items():
        if not isinstance(head, dict) or not _strings(head.get("classes")) or not head["classes"]:
            raise BundleError(f"{where}: head {_short(name)} needs a non-empty list of class names")
        if "weights" in head:
            safe_relative(head["weights"], where, f"head {name!r} weights")
    for name, folder in {**m.get("adapters", {}), **m.get("files", {})}.items():
        safe_relative(folder, where, f"entry {_short(name)}")
    if "classes" in m and not _strings(m["classes"]):
        raise BundleError(f"{where}: `classes` must be a list of strings")
    if m["kind"] == "classifier" and not m.get("heads"):
        raise BundleError(f"{where}: a classifier bundle needs `heads` (or `classes`)")
    if m["kind"] == "generator" and not m.get("adapters"):
        raise BundleError(f"{where}: a generator bundle needs `adapters`")
    return m


def safe_relative(path: Any, where: str, what: str) -> str:
    """A path inside the bundle: relative, no `..`; anything else could point loading at any file."""
    if not isinstance(path, str) or not path:
        raise BundleError(f"{where}: {what} must be a folder or file name inside the bundle")
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path or ":" in path:
        raise BundleError(f"{where}: {what} points outside the bundle ({_short(path)})")
    return path


def _fields(obj: dict, schema: dict, where: str, prefix: str) -> None:
    for key, (types, required) in schema.items():
        if key not in obj:
            if required:
                raise BundleError(f"{where}: the manifest lacks `{prefix}{key}`")
            continue
        value = obj[key]
        # bool is an int subclass: a `true` where a number belongs is still the wrong type.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise BundleError(f"{where}: `{prefix}{key}` has the wrong type ({type(value).__name__})")


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
