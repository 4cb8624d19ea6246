"""A trained classifier: a base + what a method trained on it (a head, an adapter, blocks) + the labels.

    spec = headstart.load("runs/trec-ft")
    spec.predict(["Who wrote Hamlet ?"])                  # ['HUM']
    spec.evaluate("../shared/data/trec")["accuracy"]

Prediction reads the feature cache (frozen-base methods reuse features extracted at fit time)
but never writes to it: a long-running process that predicts must not grow the cache.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..bases.image import feature_view_of
from ..core.errors import BundleError, HeadstartError
from ..core.metrics import classification_metrics
from ..data import Dataset, load_image, loader_for
from ..methods.base import Method, SpecialistModel
from .format import ADAPTER_DIR, check_base, read_safetensors, read_trained
from .manifest import DEFAULT, HEADS_DIR
from .inputs import evaluation_split, prediction_inputs
from .specialist import BundleSpecialist, reraise_as_bundle_error

HEAD_PREFIX = "head."


class Specialist(BundleSpecialist):
    """A base + what a method trained on it + the label names.

    >>> spec = headstart.load("runs/trec-ft")
    >>> spec.predict(["Who wrote Hamlet ?"])
    ['HUM']
    """

    bundle_kind = "classifier"

    def __init__(self, model: SpecialistModel, method: Method, classes: list[str], manifest: dict[str, Any]):
        super().__init__(manifest)
        self.model = model.eval()
        self.method = method
        self.classes = list(classes)
        self.named_heads: dict[str, tuple[list[str], dict[str, torch.Tensor]]] = {}
        """Heads saved beside the default one, by name: (classes, {"head.weight", "head.bias"}) -- a head per
        task over one body (multi-task fits, merges of specialists with different label sets)."""
        self.default_head = True
        """False: the bundle names only `named_heads` (the model's own head is one of them), so a caller must
        pick a head by name."""

    @property
    def kind(self) -> str:
        """The base's kind: "image" or "text" (what `predict` takes)."""
        return self.model.base.kind

    @property
    def heads(self) -> list[str]:
        """Names of the heads the bundle holds (`load(folder, head=name)` picks one)."""
        return list(self.manifest.get("heads", {DEFAULT: None}))

    # ---- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, xs: Sequence[Any], batch_size: int = 64, progress: bool = False,
                      store_features: bool = False) -> torch.Tensor:
        """Class probabilities [N, C] for image paths / PIL images (image bases) or strings (text bases).

        Features of a frozen base are read from the cache when there; `store_features=True` also adds
        the new ones (`evaluate` does, for a dataset's bounded, repeated splits; serving never should).
        """
        xs = prediction_inputs(xs, self.kind)
        if self.method.frozen_base and all(isinstance(x, str) for x in xs):
            # The base is untouched (probe, prototype): features cached at fit time serve here too.
            from ..engine.features import cached_features

            feats, _ = cached_features(self.model.base, xs, loader_for(self.kind), batch_size, progress,
                                       store=store_features)
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
        data, split, items, labels = evaluation_split(data, split, self.classes,
                                                      self.manifest.get("data", {}).get("columns", {}))
        true = torch.tensor(labels)
        pred = self.predict_proba(items, progress=progress, store_features=True).argmax(-1)
        metrics = classification_metrics(pred, true, self.classes)
        metrics.update(split=split, skipped=len(data.skipped))
        return metrics

    # ---- bundle ----------------------------------------------------------------------------
    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return self.method.trained_state(self.model)

    def bundle_manifest(self) -> dict[str, Any]:
        # The head in memory is written as the default one; heads this bundle was not loaded with
        # are not carried over (their weight files stay with the bundle they came from).
        heads = {DEFAULT: {"classes": self.classes}} if self.default_head else {}
        heads.update({name: {"classes": list(classes), "weights": f"{HEADS_DIR}/{name}.safetensors"}
                      for name, (classes, _) in self.named_heads.items()})
        return {**super().bundle_manifest(), "classes": self.classes, "heads": heads}

    def base_model_relation(self) -> str:
        # "finetune" when the bundle stores changed base weights (finetune, scratch, adabn's statistics);
        # a head, a PEFT adapter or a prompt on the untouched base is an "adapter" in the hub's terms.
        changed = any(k.startswith("backbone.") for k in self.method.trained_state(self.model))
        return "finetune" if changed else "adapter"

    def write_extras(self, tmp: Path, full: dict[str, Any]) -> None:
        from .plots import plot_confusion, plot_learning_curves  # matplotlib costs ~1 s to import

        self.method.save_artifacts(self.model, tmp, full["base"]["name"])
        if self.named_heads:
            from safetensors.torch import save_file

            (tmp / HEADS_DIR).mkdir()
            for name, (_, tensors) in self.named_heads.items():
                save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / HEADS_DIR / f"{name}.safetensors")
        plots = tmp / "plots"
        plots.mkdir()
        title = f"{full['method']['name']} on {full['base']['name']}"
        curves = plot_learning_curves(full.get("history", []), plots / "learning_curves.png", title)
        full["plots"] = {"learning_curves": curves}
        if "confusion" in full.get("metrics", {}):
            plot_confusion(full["metrics"]["confusion"], self.classes, plots / "confusion_matrix.png", title)
            full["plots"]["confusion_matrix"] = True

    @classmethod
    def load(cls, folder: str | Path, base: Any = None, head: str | None = None) -> "Specialist":
        """Rebuild a specialist from a bundle; refuses a base whose weights hash differs.

        `base`: an already loaded Backbone to build on instead of loading one, so many specialists
        share one base in memory (a server). Only bundles that leave the base untouched (probe,
        prototype) can share; the rest change the base's weights and need their own.
        `head`: which of the bundle's heads to use (default: "default", or the only one).

        >>> base = headstart.load_base("minilm-l6")
        >>> topic, tone = (headstart.load(f, base=base) for f in ("runs/topic", "runs/tone"))
        """
        from ..bases import load_base
        from ..methods.registry import make_method

        folder = Path(folder)
        manifest = cls.open_manifest(folder)
        head_name, classes = pick_head(folder, manifest, head)
        try:
            method = make_method(manifest["method"]["name"], **manifest["method"]["config"])
        except (HeadstartError, TypeError, ValueError) as e:
            raise reraise_as_bundle_error(folder, "its method cannot be rebuilt", e) from None
        if base is not None and not (method.frozen_base and not manifest.get("adapters")):
            raise BundleError(f"{folder}: a {method.name} bundle changes its base's weights, so it cannot share "
                              "a loaded base; load it without base=")
        backbone = base if base is not None else load_base(manifest["base"]["name"], pretrained=method.needs_pretrained)
        check_base(manifest, backbone.info.sha256)
        _match_preprocessing(folder, manifest, backbone, shared=base is not None)
        cls.vet_adapter_folders(folder, manifest)
        if set(manifest.get("adapters", {}).values()) - {ADAPTER_DIR}:
            # Classifier methods restore their adapter from the fixed folder (methods/lora, methods/setfit).
            raise BundleError(f"{folder}: classifier adapters are read from {ADAPTER_DIR}/, this bundle names "
                              f"{', '.join(sorted(manifest['adapters'].values()))}")
        state = head_state(folder, manifest, head_name, read_trained(folder))
        foreign = [k for k in state if not k.startswith(HEAD_PREFIX) and k != "center"]
        if base is not None and foreign:  # they would be copied into the base every specialist shares
            raise BundleError(f"{folder}: a frozen-base bundle holds base weights ({foreign[0]!r}); refused")
        try:
            model = method.restore(backbone, len(classes), state, folder)
        except (HeadstartError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise reraise_as_bundle_error(folder, "its stored weights do not fit its method and base", e) from None
        spec = cls(model, method, classes, manifest)
        spec.folder = folder
        return spec


def pick_head(folder: Path, manifest: dict[str, Any], head: str | None) -> tuple[str, list[str]]:
    """The head to load (`head`, else the default one) and its classes; a bundle with a head per task and
    no default refuses to guess."""
    heads = manifest["heads"]
    if head is None:
        if DEFAULT not in heads and len(heads) > 1:
            raise BundleError(f"{folder}: holds a head per task ({', '.join(heads)}): pick one with head= "
                              "(the command line: --task NAME)")
        head = DEFAULT if DEFAULT in heads else next(iter(heads))
    if head not in heads:
        raise BundleError(f"{folder}: no head {head!r} (it holds: {', '.join(map(repr, heads))})")
    return head, list(heads[head]["classes"])


def head_state(folder: Path, manifest: dict[str, Any], head: str, state: dict[str, torch.Tensor]) -> dict:
    """The stored state with head `head`'s tensors in place of the default head's."""
    entry = manifest["heads"][head]
    if "weights" not in entry:
        return state
    own = read_safetensors(folder / entry["weights"], f"head {head!r} weights")
    return {**{k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX) and k != "center"}, **own}


def _match_preprocessing(folder: Path, manifest: dict[str, Any], backbone, shared: bool) -> None:
    """Run the base the way the bundle was trained: its input size and its feature view (both preprocessing)."""
    pre = manifest.get("preprocessing", {})
    size, view = pre.get("input_size"), feature_view_of(pre)
    if backbone.kind != "image":
        return
    now = backbone.info.preprocessing
    if size and size != now.get("input_size"):
        if shared:  # resizing would change every other specialist on this base
            raise BundleError(f"{folder}: trained at input size {size}, the shared base runs at "
                              f"{now.get('input_size')}; load it without base=")
        if not isinstance(size, list) or not size or not isinstance(size[-1], int):
            raise BundleError(f"{folder}: `preprocessing.input_size` must be a list of integers")
        try:
            backbone.set_input_size(size[-1])  # the resolution it was trained at
        except ValueError as e:
            raise reraise_as_bundle_error(folder, "its input size does not suit its base", e) from None
    if view != feature_view_of(now):
        if shared:  # as with resizing: every other specialist on this base would see other features
            raise BundleError(f"{folder}: trained on the {view!r} feature view, the shared base gives "
                              f"{feature_view_of(now)!r}; load it without base=")
        try:
            backbone.set_feature_view(view)
        except ValueError as e:
            raise reraise_as_bundle_error(folder, "its feature view does not suit its base", e) from None
