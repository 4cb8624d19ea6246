"""What a federation leaves: the global specialist as a normal bundle, each client's personalised
version (the global one + one local night of `headstart.update`), and the yardstick of every client
training alone on its shard."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable

from .model import Party


def global_specialist(party: Party, arrays: list, *, test, source: str, seed: int, train_examples: int,
                      rows: list[dict[str, Any]], details: dict[str, Any]):
    """The federation's result as a classifier `Specialist` (the same bundle `fit` writes), evaluated on `test`."""
    from ...bundle.classifier import Specialist
    from ...data import Dataset

    party.set_arrays(arrays)
    info = party.backbone.info
    manifest = {
        "task": "classify",
        "base": info.to_json(),
        "method": {"name": party.method.name, "config": party.method.config.to_json()},
        "classes": list(party.classes),
        "preprocessing": info.preprocessing,
        "seed": seed,
        "data": {"source": source, "kind": party.kind, "train_examples": train_examples,
                 "splits": {"test": len(test)}, "sampling": {"split_by": "federated"}, "skipped": [], "odd_names": 0,
                 "columns": {}},
        "history": rows,
        "details": {"federated": details},
        "training": {"processes": details.get("clients", 1), "device": "federated", "precision": "fp32"},
    }
    spec = Specialist(party.model, party.method, party.classes, manifest)
    metrics = spec.evaluate(Dataset(party.kind, list(party.classes), {"test": test}, source), progress=False)
    metrics["trainable_params"] = sum(p.numel() for p in party.model.parameters() if p.requires_grad)
    spec.manifest["metrics"] = metrics
    return spec


def alone_accuracies(party: Party, initial: list, shards: list, *, test, epochs: int | None, seed: int,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each client training on its own shard only, as `fit` would: from the federation's starting adapter, the
    head a probe on its shard (unless the method's `head_init` is random), the same engine and method (the
    method's own number of epochs unless `epochs`), measured on the same test set."""
    from ...engine.schedule import warmup_cosine_schedule
    from .model import remap_labels
    from .warmup import probe_head

    out = []
    for i, shard in enumerate(shards):
        train, _, own = shard.load()
        train = remap_labels(train, own, party.classes)
        party.set_arrays(initial)
        if party.method.config.head_init == "probe":
            probe_head(party, train)
        party.train(train, epochs=epochs or party.method.config.epochs,
                    proximal_mu=0.0, seed=seed * 100_003 + i, log=lambda _: None,
                    lr_schedule=warmup_cosine_schedule(party.method.config.warmup_ratio))
        accuracy = party.accuracy(test)
        log(f"  {shard.name} alone ({len(train)} examples): accuracy {accuracy:.4f}")
        out.append({"client": shard.name, "examples": len(train), "accuracy": accuracy})
    return out


def personalise_clients(bundle: Path, shards: list, *, classes: list[str], kind: str, test, seed: int,
                        folder: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every client's own version: the global bundle updated for one night on its shard. Each is measured
    beside the global one on the test examples of the classes that client holds (its own distribution)."""
    from ...bundle.commands import load
    from ...continual.update import UpdateOptions, update_specialist
    from ...data import Dataset, Split
    from .model import remap_labels

    out = []
    for shard in shards:
        train, _, own = shard.load()
        train = remap_labels(train, own, classes)
        held = set(train.labels)
        mine = [i for i, y in enumerate(test.labels) if y in held]
        local = Dataset(kind, list(classes), {"test": Split([test.items[i] for i in mine], [test.labels[i] for i in mine])},
                        f"{shard.name} local test")
        night = write_shard(train, classes, kind, folder / "nights" / shard.name)
        target = folder / shard.name
        # max_forgetting=None: a personal version is meant to lean towards its client's data, so the
        # night always lands (the guard's figures are still measured and reported by `update`).
        report = update_specialist(bundle, [night], target, UpdateOptions(seed=seed, max_forgetting=None,
                                                                          log=lambda _: None))
        if not (target / "manifest.json").exists() and not (target / "LINEAGE.json").exists():
            target = bundle  # nothing new to learn on this shard: the client keeps the global version
        row = {"client": shard.name, "bundle": str(target), "accepted": bool(report.get("accepted")),
               "local_test": len(mine),
               "global_accuracy": float(load(bundle).evaluate(local, progress=False)["accuracy"]) if mine else None,
               "personal_accuracy": float(load(target).evaluate(local, progress=False)["accuracy"]) if mine else None}
        log(f"  {shard.name} personalised: {row['personal_accuracy']} vs global {row['global_accuracy']} "
            f"on its {len(mine)} local test examples")
        out.append(row)
    return out


def write_shard(split, classes: list[str], kind: str, folder: Path) -> Path:
    """A shard as data `update` reads: a `text,label` table, or an image folder of links per class."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path = folder / "night.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows([text, classes[y]] for text, y in zip(split.items, split.labels))
        return path
    for i, (item, y) in enumerate(zip(split.items, split.labels)):
        link = folder / classes[y] / f"{i:06d}{Path(item).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(os.path.abspath(item), link)
    return folder
