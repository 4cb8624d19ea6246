"""What a specialist remembers of the nights it learned from, carried in each version's `memory/` folder.

    memory/memory.json          store, nights (fingerprints + guard sets), replay reservoir, counters
    memory/memory.safetensors   features of the guard and replay examples (store `features`), the online
                                Fisher (EWC)
    memory/raw/                 example files (store `raw` only, opted in)

The store decides what is kept of an example (the privacy option):
- `features`: the frozen base's features and the label. No text or pixels: a bundle made with the default
  holds none. The default for frozen-base specialists (probe), whose head reads exactly these features.
- `refs`: where the example lives on this machine (its file) and its content sha256, never the content; a
  file that is gone or changed drops its examples (counted). The default for specialists whose base
  changes (finetune, lora, setfit, sft): they need the example itself to replay or to measure a guard.
  A sha256 of a very short text can be guessed by trying candidates: say `none` if that matters.
- `raw`: the examples themselves (texts in the JSON, image files under raw/): only with
  `--replay-store raw`.
- `none`: nothing (no replay, no guard sets beyond the night being learned).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import BundleError

STORES = ("features", "refs", "raw", "none")
MEMORY_DIR = "memory"
GUARD_CAP = 200
"""At most this many held-back examples per night: enough for +-3 points, small enough to carry."""


@dataclass
class ExampleSet:
    """Examples as the store keeps them: label names (classes may grow), content keys, and one payload."""

    labels: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    """sha256 of each example's content (engine.features.item_key): the journal and refs check them."""
    features: torch.Tensor | None = None
    """[N, D] frozen-base features (store `features`)."""
    refs: list[str] | None = None
    """The file (image) or table / folder (text) each example came from (store `refs`)."""
    raw: list[str] | None = None
    """Texts, or image file names under memory/raw/ (store `raw`)."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int]) -> "ExampleSet":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        feats = None if self.features is None else self.features[torch.tensor(idx, dtype=torch.long)]
        return ExampleSet(pick(self.labels), pick(self.keys), feats, pick(self.refs), pick(self.raw))

    def concat(self, other: "ExampleSet") -> "ExampleSet":
        if not len(self):
            return other
        if not len(other):
            return self
        join = lambda a, b: None if a is None or b is None else a + b  # noqa: E731
        feats = None if self.features is None or other.features is None else torch.cat([self.features, other.features])
        return ExampleSet(self.labels + other.labels, self.keys + other.keys, feats, join(self.refs, other.refs),
                          join(self.raw, other.raw))

    def to_json(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"labels": self.labels, "keys": self.keys}
        if self.features is not None:
            out["features"] = name  # the tensor's key in memory.safetensors
        if self.refs is not None:
            out["refs"] = self.refs
        if self.raw is not None:
            out["raw"] = self.raw
        return out

    @classmethod
    def from_json(cls, js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ExampleSet":
        feats = tensors.get(js["features"]) if "features" in js else None
        if "features" in js and feats is None:
            raise BundleError(f"memory: features {js['features']!r} missing from memory.safetensors")
        out = cls(list(js["labels"]), list(js["keys"]), feats, js.get("refs"), js.get("raw"))
        for payload in (out.refs, out.raw):
            if payload is not None and len(payload) != len(out.labels):
                raise BundleError("memory: an example set's payload and labels differ in length")
        if feats is not None and feats.shape[0] != len(out.labels):
            raise BundleError("memory: an example set's features and labels differ in length")
        return out


@dataclass
class NightRecord:
    night: int
    version: int
    fingerprint: dict[str, Any]
    """What the night held (file names, sha256s, counts per label): never content."""
    guard: ExampleSet
    """Held back from training: the forgetting guard measures every later version on it."""


@dataclass
class Memory:
    store: str
    kind: str = "text"
    """The examples' kind: "text" or "image" (raw images are files, raw texts sit in the JSON)."""
    nights: list[NightRecord] = field(default_factory=list)
    replay: ExampleSet = field(default_factory=ExampleSet)
    seen: dict[str, int] = field(default_factory=dict)
    """Examples offered to the reservoir per class, over every night (reservoir sampling's counters)."""
    replay_size: int = 1000
    scale: tuple[torch.Tensor, torch.Tensor] | None = None
    """(mean, sd) of the head's inputs a head-only specialist trains its head against (fixed per lineage)."""
    fisher: dict[str, torch.Tensor] | None = None
    """The online EWC importance of the version this memory belongs to (names of its trainable parameters)."""

    # ---- the reservoir ------------------------------------------------------------------------
    def offer(self, examples: ExampleSet, size: int | None, rng: random.Random) -> None:
        """Class-balanced reservoir sampling: each class keeps a uniform sample of what it offered, at most
        size / classes seen examples (`size=None`: keep everything, what `joint` needs)."""
        if self.store == "none":
            return
        self.replay_size = size if size is not None else 0
        merged = self.replay.concat(examples)
        classes = sorted(set(merged.labels) | set(self.seen))
        offered = dict(self.seen)
        keep: list[int] = []
        for c in classes:
            old = [i for i in range(len(self.replay)) if self.replay.labels[i] == c]
            new = [len(self.replay) + i for i in range(len(examples)) if examples.labels[i] == c]
            offered[c] = self.seen.get(c, 0) + len(new)
            quota = len(old) + len(new) if size is None else max(1, size // max(1, len(classes)))
            chosen = list(old)
            for k, i in enumerate(new):  # algorithm R per class
                n = self.seen.get(c, 0) + k + 1
                if len(chosen) < quota:
                    chosen.append(i)
                else:
                    j = rng.randrange(n)
                    if j < len(chosen):
                        chosen[j] = i
            if len(chosen) > quota:  # a new class shrank every class's share
                chosen = rng.sample(chosen, quota)
            keep += sorted(chosen)
        self.replay, self.seen = merged.subset(sorted(keep)), offered

    # ---- files --------------------------------------------------------------------------------
    def write(self, version_folder: Path, source_folder: Path | None = None) -> None:
        """Write into `version_folder/memory/` (a version being staged); raw files are copied from the
        memory of `source_folder` (the previous version) or from where the night's examples are."""
        from safetensors.torch import save_file

        folder = Path(version_folder) / MEMORY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        js: dict[str, Any] = {"format": "headstart-memory", "store": self.store, "kind": self.kind, "replay_size": self.replay_size,
                              "seen": self.seen, "nights": [], "replay": None, "fisher": None}
        for rec in self.nights:
            name = f"guard.{rec.night}"
            if rec.guard.features is not None:
                tensors[name] = rec.guard.features.half().contiguous()
            js["nights"].append({"night": rec.night, "version": rec.version, "fingerprint": rec.fingerprint,
                                 "guard": rec.guard.to_json(name)})
        if self.replay.features is not None:
            tensors["replay"] = self.replay.features.half().contiguous()
        js["replay"] = self.replay.to_json("replay")
        if self.scale is not None:
            mean, sd = self.scale
            tensors.update({"scale.mean": mean.float().contiguous(), "scale.sd": sd.float().contiguous()})
        if self.fisher:
            js["fisher"] = sorted(self.fisher)
            tensors.update({f"fisher.{k}": v.float().contiguous() for k, v in self.fisher.items()})
        if self.store == "raw" and self.kind == "image":
            _copy_raw(self, folder, source_folder)
        if tensors:
            save_file(tensors, folder / "memory.safetensors", metadata={"format": "headstart-memory"})
        (folder / "memory.json").write_text(json.dumps(js, indent=1))

    @classmethod
    def read(cls, version_folder: Path) -> "Memory | None":
        """The memory of a version, or None when it has none (a bundle made by `fit`)."""
        from ..bundle.format import read_safetensors

        folder = Path(version_folder) / MEMORY_DIR
        if not (folder / "memory.json").is_file():
            return None
        try:
            js = json.loads((folder / "memory.json").read_text())
            if js.get("format") != "headstart-memory" or js.get("store") not in STORES:
                raise ValueError("not a headstart memory")
            path = folder / "memory.safetensors"
            tensors = {k: v.float() for k, v in read_safetensors(path, "memory").items()} if path.exists() else {}
            nights = [NightRecord(int(n["night"]), int(n["version"]), dict(n["fingerprint"]),
                                  ExampleSet.from_json(n["guard"], tensors)) for n in js["nights"]]
            replay = ExampleSet.from_json(js["replay"], tensors) if js.get("replay") else ExampleSet()
            fisher = {k: tensors[f"fisher.{k}"] for k in js["fisher"]} if js.get("fisher") else None
            scale = (tensors["scale.mean"], tensors["scale.sd"]) if "scale.mean" in tensors else None
            return cls(js["store"], js.get("kind", "text"), nights, replay,
                       {str(k): int(v) for k, v in js.get("seen", {}).items()}, int(js.get("replay_size", 0)),
                       scale, fisher)
        except (ValueError, KeyError, TypeError) as e:
            raise BundleError(f"{folder}: damaged memory ({e})") from None


def raw_folder(version_folder: Path) -> Path:
    return Path(version_folder) / MEMORY_DIR / "raw"


def _copy_raw(memory: Memory, folder: Path, source_folder: Path | None) -> None:
    """Image files of store `raw` live under memory/raw/, named by content hash: an example offered tonight
    is an absolute path to the user's file, one kept from before a name in the previous version's raw/."""
    out = folder / "raw"
    for examples in [memory.replay] + [n.guard for n in memory.nights]:
        for i, name in enumerate(examples.raw or []):
            src = Path(name) if Path(name).is_absolute() else (
                raw_folder(source_folder) / name if source_folder is not None else None)
            if src is None or not src.is_file():
                continue  # gone: the example drops out when it is next read
            out.mkdir(exist_ok=True)
            dest = out / f"{examples.keys[i]}{src.suffix.lower()}"
            if not dest.exists():
                shutil.copy2(src, dest)
            examples.raw[i] = dest.name
