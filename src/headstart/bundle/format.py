"""The bundle: the one artifact headstart writes and reads.

    <bundle>/
      manifest.json         kind (classifier / generator), base (name + weights sha256), method +
                            config, heads and their labels, adapters, preprocessing, metrics,
                            data and training facts, library versions (schema: manifest.py)
      trained.safetensors   only what was trained (heads; unfrozen blocks for finetune;
                            everything for scratch) -- never the frozen base; absent when
                            nothing but an adapter was trained (generators)
      adapter/              PEFT's own adapter folder; the manifest's `adapters` names it
      metrics.json          the report's numbers
      README.md             model card (Hugging Face YAML front matter)
      plots/*.png           learning curves, confusion matrix

Written into a temporary sibling folder and renamed into place, so a crash never leaves a
half-written bundle where a good one was. Loading reads JSON and safetensors only: no pickle,
no code from the bundle runs, and whatever is damaged is reported as one BundleError line.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.errors import BundleError
from ..core.storage import ADAPTER_DIR, atomic_dir
from .manifest import DEFAULT, upgrade_v1, validate

if TYPE_CHECKING:  # torch is imported where tensors are read or written: `headstart info` needs none
    import torch

FORMAT = "headstart-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TRAINED = "trained.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WRITER_KEYS = ("format", "format_version", "files", "versions", "created", "adapters")
"""Manifest keys the writer sets itself: a re-save drops the old values and writes fresh ones."""
_PICKLE_LIKE = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip (a pickle inside)


def library_versions() -> dict[str, str]:
    import accelerate
    import torch
    import peft
    import safetensors
    import timm
    import transformers

    from .. import __version__

    return {"headstart": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}


def write_bundle(folder: str | Path, manifest: dict[str, Any], trained: dict[str, torch.Tensor] | None,
                 write_extras: Callable[[Path, dict], None]) -> Path:
    """Write a bundle atomically; `write_extras(tmp_folder, full_manifest)` adds adapters, card and plots
    (and may add to the manifest, which is written last). `trained=None` writes no trained.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder).resolve()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                **{k: v for k, v in manifest.items() if k not in WRITER_KEYS},
                "files": {"trained": TRAINED} if trained is not None else {},
                "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_dir(folder) as tmp:
        if trained is not None:
            # Tied/shared tensors must be saved as separate copies: safetensors refuses shared storage.
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in trained.items()}, tmp / TRAINED,
                      metadata={"format": FORMAT})
        write_extras(tmp, manifest)
        adapters = find_adapters(tmp)
        if adapters:
            manifest["adapters"] = adapters
        validate(manifest, str(folder))  # never write what load would refuse
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    return folder


def find_adapters(folder: Path) -> dict[str, str]:
    """{adapter name: folder} for the PEFT adapter folders written into `folder` (`adapter/` is "default")."""
    return {DEFAULT if p.parent.name == ADAPTER_DIR else p.parent.name: p.parent.name
            for p in sorted(folder.glob(f"*/{ADAPTER_CONFIG}"))}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The bundle's manifest, schema-checked and in the version-2 shape (v1 bundles upgraded in memory).
    A lineage folder (bundle/lineage.py) reads its current version's manifest."""
    from .lineage import resolve_bundle  # lineage reads manifests through this module: imported here

    folder = resolve_bundle(folder)  # also undoes an interrupted swap, as before
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: not a headstart bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise BundleError(f"{path}: unreadable manifest ({one_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a headstart bundle manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path}: `format_version` must be a positive integer")
    if version > FORMAT_VERSION:
        raise BundleError(f"{folder}: bundle format {version} is newer than this headstart "
                          f"({FORMAT_VERSION}); upgrade headstart")
    return validate(upgrade_v1(manifest, (folder / ADAPTER_DIR).is_dir()), str(path))


def read_safetensors(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (missing, truncated, a pickle) is a BundleError.
    Parsing safetensors never runs code, so a pickle is only named, after it failed to parse."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BundleError(f"{path.parent}: incomplete bundle (no {path.name})")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise not_safetensors(path, what, e) from None


def read_trained(folder: str | Path, name: str = TRAINED) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(folder) / name, "trained weights")


def not_safetensors(path: Path, what: str, e: BaseException) -> BundleError:
    """The error for a file that failed to parse as safetensors: a pickle is named as one."""
    # Checked only after parsing failed: a valid safetensors file may start with 0x80 too (its first
    # byte is the low byte of the header length).
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_LIKE):
        return BundleError(f"{path}: {what} are a pickle / torch.save file, not safetensors; refused "
                           "(headstart never unpickles)")
    return BundleError(f"{path}: damaged {what} ({one_line(e)})")


def check_base(manifest: dict[str, Any], actual_sha256: str) -> None:
    """Refuse a base whose weights differ from the ones the specialist was trained on."""
    expected = manifest["base"]["sha256"]
    if expected != actual_sha256:
        raise BundleError(f"base mismatch: this bundle was trained on {manifest['base']['name']!r} with weights "
                          f"sha256 {expected[:12]}..., but the base found here has {actual_sha256[:12]}...; "
                          "install the matching base weights")


def one_line(e: BaseException) -> str:
    """An exception's message on one line, at most 200 characters (for a BundleError's detail)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _json_default(o: Any):
    import torch

    if isinstance(o, Path):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
