"""A trained specialist: predict, evaluate, save as a bundle, load from one."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..bases import load_base
from .format import check_base, read_manifest, read_trained, write_bundle
from .card import model_card
from ..data import Dataset, load_dataset, load_eval_dataset, load_image
from ..engine.features import cached_features
from ..core.errors import DataError, LabelError
from ..methods.base import Method, SpecialistModel
from ..methods.registry import make_method
from ..core.metrics import classification_metrics


class Specialist:
    """A base + what a method trained on it + the label names.

    >>> spec = headstart.load("runs/trec-ft")
    >>> spec.predict(["Who wrote Hamlet ?"])
    ['HUM']
    """

    def __init__(self, model: SpecialistModel, method: Method, classes: list[str], manifest: dict[str, Any]):
        self.model = model.eval()
        self.method = method
        self.classes = list(classes)
        self.manifest = manifest
        self.is_main_process = True
        """False on the non-main processes of an `accelerate launch` run (they neither save nor report)."""

    # ---- inference -------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.model.base.kind

    @torch.no_grad()
    def predict_proba(self, xs: Sequence[Any], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Class probabilities [N, C] for image paths / PIL images (image bases) or strings (text bases)."""
        xs = self._check_inputs(xs)
        if self.method.frozen_base and all(isinstance(x, str) for x in xs):
            # The base is untouched (probe, prototype, zeroshot): reuse cached features of these files/texts.
            load = load_image if self.kind == "image" else (lambda x: x)
            feats, _ = cached_features(self.model.base, xs, load, batch_size, progress)
            return self.model.classify(feats).float().softmax(-1)
        def load(x: Any) -> Any:  # image paths are decoded; PIL images and texts pass through
            return load_image(x) if self.kind == "image" and isinstance(x, str) else x

        out = []
        for start in tqdm(range(0, len(xs), batch_size), disable=not progress, file=sys.stderr, desc="predict"):
            chunk = [load(x) for x in xs[start:start + batch_size]]
            out.append(self.model(**self.model.collate(chunk, False)).float().softmax(-1))
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def predict(self, xs: Sequence[Any], batch_size: int = 64) -> list[str]:
        """Predicted label names."""
        return [self.classes[i] for i in self.predict_proba(xs, batch_size).argmax(-1).tolist()]

    def evaluate(self, data: Dataset | str | Path, split: str | None = None, progress: bool = True) -> dict[str, Any]:
        """Accuracy, macro-F1, per-class F1 and the confusion matrix on a split (default: test, else val;
        a single table file, or class folders without splits, is evaluated whole)."""
        if not isinstance(data, Dataset):
            cols = self.manifest.get("data", {}).get("columns", {})
            # A single test file is evaluated whole, not split 80/20 as a training file would be.
            data = load_dataset(data, **cols) if split else load_eval_dataset(data, **cols)
        split = split or data.eval_split
        part = data.split(split)
        unseen = sorted({data.classes[y] for y in part.labels} - set(self.classes))
        if unseen:
            raise LabelError(f"{data.source} ({split}) has labels this specialist never saw: {', '.join(unseen[:8])} "
                             f"(it knows: {', '.join(self.classes)})")
        index = {c: i for i, c in enumerate(self.classes)}
        true = torch.tensor([index[data.classes[y]] for y in part.labels])
        pred = self.predict_proba(part.items, progress=progress).argmax(-1)
        metrics = classification_metrics(pred, true, self.classes)
        metrics.update(split=split, skipped=len(data.skipped))
        return metrics

    def _check_inputs(self, xs: Sequence[Any]) -> list[Any]:
        if isinstance(xs, (str, Path)):
            xs = [xs]
        xs = [str(x) if isinstance(x, Path) else x for x in xs]
        if self.kind == "image":
            for x in xs:
                if isinstance(x, str) and not Path(x).is_file():
                    raise DataError(f"no such image file: {x}")
        return xs

    # ---- bundle ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write this specialist as a bundle folder (atomically)."""
        folder = Path(folder)
        manifest = {k: v for k, v in self.manifest.items() if k not in ("format", "format_version", "files",
                                                                          "versions", "created")}
        manifest["bundle_name"] = str(folder)
        trained = self.method.trained_state(self.model)

        def extras(tmp: Path, full: dict) -> None:
            from .plots import plot_confusion, plot_learning_curves  # matplotlib costs ~1 s to import

            self.method.save_artifacts(self.model, tmp, full["base"]["name"])
            plots = tmp / "plots"
            plots.mkdir()
            title = f"{full['method']['name']} on {full['base']['name']}"
            full["plots"] = {"learning_curves": plot_learning_curves(full.get("history", []), plots / "learning_curves.png", title)}
            if "confusion" in full.get("metrics", {}):
                plot_confusion(full["metrics"]["confusion"], self.classes, plots / "confusion_matrix.png", title)
                full["plots"]["confusion_matrix"] = True
            (tmp / "metrics.json").write_text(_dumps(full.get("metrics", {})))
            (tmp / "README.md").write_text(model_card(full))

        out = write_bundle(folder, manifest, trained, extras)
        self.manifest = read_manifest(out)
        return out

    @classmethod
    def load(cls, folder: str | Path) -> "Specialist":
        """Rebuild a specialist from a bundle; refuses a base whose weights hash differs."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        method = make_method(manifest["method"]["name"], **manifest["method"]["config"])
        backbone = load_base(manifest["base"]["name"], pretrained=method.needs_pretrained)
        check_base(manifest, backbone.info.sha256)
        size = manifest.get("preprocessing", {}).get("input_size")
        if size and backbone.kind == "image" and size != backbone.info.preprocessing.get("input_size"):
            backbone.set_input_size(size[-1])  # the resolution it was trained at
        model = method.restore(backbone, len(manifest["classes"]), read_trained(folder), folder)
        return cls(model, method, manifest["classes"], manifest)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=float)
