"""What every specialist shares, whatever it does with its base: the manifest, the one bundle writer,
the checks a load makes, the model card.

    BundleSpecialist
      ├── Specialist      (classifier.py: base + heads; predict / evaluate)
      └── LMSpecialist    (generator.py: causal LM + adapters; generate / evaluate / export)

A subclass says what it stores (`trained_tensors`, `write_extras`) and how it rebuilds itself
(`load`); saving, the manifest's kind, metrics.json and README.md live here once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.errors import BundleError, HeadstartError
from .adapters import check_adapter_folder
from .format import ADAPTER_DIR, find_adapters, read_manifest, write_bundle
from .manifest import DEFAULT

if TYPE_CHECKING:
    import torch


class BundleSpecialist:
    """A trained specialist that lives in a bundle folder. Subclasses set `bundle_kind`."""

    bundle_kind: ClassVar[str] = ""
    """"classifier" or "generator": the manifest's `kind`, which `headstart.load` dispatches on."""

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest
        self.folder: Path | None = None
        """The bundle this specialist was loaded from or last saved to (None after an unsaved fit)."""
        self.is_main_process = True
        """False on the non-main processes of an `accelerate launch` run (they neither save nor report)."""

    # ---- what a subclass provides -----------------------------------------------------------
    def trained_tensors(self) -> dict[str, torch.Tensor] | None:
        """What goes into trained.safetensors; None writes no such file."""
        return None

    def write_extras(self, tmp: Path, manifest: dict[str, Any]) -> None:
        """Add adapters, plots, reports to the bundle being written (before the card and manifest)."""

    def base_model_relation(self) -> str | None:
        """Hugging Face's `base_model_relation` for the card; None lets the card guess from the adapters."""
        return None

    def bundle_manifest(self) -> dict[str, Any]:
        """The manifest to write (the writer adds format, versions, files, adapters)."""
        return {**self.manifest, "kind": self.bundle_kind}

    # ---- the one writer -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write this specialist as a bundle folder, atomically, and re-read the manifest as written."""
        from .card import model_card

        manifest = self.bundle_manifest()
        manifest["bundle_name"] = str(folder)

        def extras(tmp: Path, full: dict) -> None:
            self.write_extras(tmp, full)
            (tmp / "metrics.json").write_text(json.dumps(full.get("metrics", {}), indent=2, default=float))
            card_view = {**full, "adapters": find_adapters(tmp)}
            (tmp / "README.md").write_text(model_card(card_view, self.base_model_relation()))

        out = write_bundle(folder, manifest, self.trained_tensors(), extras)
        self.manifest = read_manifest(out)
        self.folder = out
        return out

    # ---- what every load checks -----------------------------------------------------------
    @classmethod
    def open_manifest(cls, folder: str | Path) -> dict[str, Any]:
        """The bundle's checked manifest; a bundle of the other kind is a BundleError."""
        manifest = read_manifest(folder)
        if cls.bundle_kind and manifest["kind"] != cls.bundle_kind:
            raise BundleError(f"{folder}: a {manifest['kind']} bundle, not a {cls.bundle_kind} one")
        return manifest

    @staticmethod
    def adapter_folder(folder: str | Path, manifest: dict[str, Any], name: str | None = None) -> Path:
        """The vetted PEFT folder of adapter `name` (default: "default", or the only one)."""
        adapters = manifest.get("adapters", {})
        if name is None:
            name = DEFAULT if DEFAULT in adapters or len(adapters) != 1 else next(iter(adapters))
        if name not in adapters:
            raise BundleError(f"{folder}: no adapter {name!r} (it holds: {', '.join(map(repr, adapters)) or 'none'})")
        return check_adapter_folder(Path(folder) / adapters[name])

    @staticmethod
    def vet_adapter_folders(folder: str | Path, manifest: dict[str, Any]) -> None:
        """Check every adapter the manifest names, and the fixed `adapter/` folder methods read even when
        a tampered manifest leaves it out."""
        folder = Path(folder)
        names = set(manifest.get("adapters", {}).values())
        if (folder / ADAPTER_DIR).exists():
            names.add(ADAPTER_DIR)
        for sub in sorted(names):
            check_adapter_folder(folder / sub)


def reraise_as_bundle_error(folder: str | Path, what: str, e: Exception) -> BundleError:
    """One line naming the bundle and the damaged part, for errors raised while rebuilding from it."""
    detail = " ".join(str(e).split())
    if len(detail) > 200:
        detail = detail[:197] + "..."
    kind = "" if isinstance(e, HeadstartError) else f"{type(e).__name__}: "
    return BundleError(f"{folder}: {what} ({kind}{detail})")
