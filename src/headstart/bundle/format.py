"""The bundle: the one artifact headstart writes and reads.

    <bundle>/
      manifest.json         base (name + weights sha256), method + config, labels, preprocessing,
                            metrics, data and training facts, library versions
      trained.safetensors   only what was trained (the head; unfrozen blocks for finetune;
                            everything for scratch) -- never the frozen base
      adapter/              PEFT's own adapter folder (lora): loads with PeftModel.from_pretrained
      metrics.json          the report's numbers
      README.md             model card
      plots/*.png           learning curves, confusion matrix

Written into a temporary sibling folder and renamed into place, so a crash never leaves a
half-written bundle where a good one was. Loading reads JSON and safetensors only: no pickle,
no code from the bundle runs.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import BundleError

FORMAT = "headstart-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINED = "trained.safetensors"


def library_versions() -> dict[str, str]:
    import accelerate
    import peft
    import safetensors
    import timm
    import transformers

    from .. import __version__

    return {"headstart": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}


def write_bundle(folder: str | Path, manifest: dict[str, Any], trained: dict[str, torch.Tensor],
                 write_extras: Callable[[Path, dict], None]) -> Path:
    """Write a bundle atomically; `write_extras(tmp_folder, full_manifest)` adds adapters, card and plots."""
    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                    "files": {"trained": TRAINED}, "versions": library_versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # Tied/shared tensors must be saved as separate copies: safetensors refuses shared storage.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in trained.items()}, tmp / TRAINED,
                  metadata={"format": FORMAT})
        write_extras(tmp, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def recover_interrupted_swap(folder: Path) -> None:
    """A kill between "move the old bundle aside" and "move the new one in" leaves only the old one,
    as `.<name>.old-<pid>`: put it back so the bundle is never lost."""
    if folder.exists():
        return
    leftovers = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers and (leftovers[-1] / MANIFEST).is_file():
        os.replace(leftovers[-1], folder)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    recover_interrupted_swap(folder.resolve())
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: not a headstart bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a headstart bundle manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{folder}: bundle format {manifest['format_version']} is newer than this headstart "
                          f"({FORMAT_VERSION}); upgrade headstart")
    return manifest


def read_trained(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / TRAINED
    if not path.is_file():
        raise BundleError(f"{folder}: incomplete bundle (no {TRAINED})")
    return load_file(path)


def check_base(manifest: dict[str, Any], actual_sha256: str) -> None:
    """Refuse a base whose weights differ from the ones the specialist was trained on."""
    expected = manifest["base"]["sha256"]
    if expected != actual_sha256:
        raise BundleError(f"base mismatch: this bundle was trained on {manifest['base']['name']!r} with weights "
                          f"sha256 {expected[:12]}..., but the base found here has {actual_sha256[:12]}...; "
                          "install the matching base weights")


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
