"""Run an exported `.onnx` specialist with onnxruntime, numpy, `tokenizers` and PIL: no torch.

    spec = OnnxSpecialist.load("trec.onnx")          # reads trec.onnx.json (and trec.onnx.tokenizer/)
    spec.predict(["Who wrote Hamlet ?"])             # ['HUM']
    spec.evaluate("../shared/data/trec")["accuracy"]

The preprocessing repeats the bundle's own, step for step, from the contract JSON alone: text goes
through the saved fast tokenizer (truncation at `max_length`, padding to the longest), images
through timm's eval recipe (resize the short side to size / crop_pct with the same PIL filter,
centre crop, /255, normalise). Results have the shapes `classifier.Specialist` gives.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import BundleError
from ..core.storage import sha256_file
from .inputs import evaluation_split, prediction_inputs

CONTRACT_FORMAT = "headstart-onnx"  # the same words as onnx_export's (that module imports torch)
_FILTERS = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}  # PIL codes


class OnnxSpecialist:
    """An exported classifier (or encoder) and its contract; `predict`/`evaluate` like a Specialist."""

    bundle_kind = "classifier"

    def __init__(self, path: Path, contract: dict[str, Any], session: Any, tokenizer: Any = None):
        self.folder = path  # what messages name, as a bundle's folder
        self.path, self.contract, self.session, self.tokenizer = path, contract, session, tokenizer
        self.classes: list[str] = list(contract.get("classes") or [])
        self.manifest = {"data": {"columns": contract.get("data_columns", {})}}

    @property
    def kind(self) -> str:
        """The base's kind: "image" or "text" (what `predict` takes)."""
        return self.contract["base_kind"]

    @classmethod
    def load(cls, path: str | Path) -> "OnnxSpecialist":
        """Open `path` (an .onnx file) with the contract JSON beside it; refuses a pair that does not match."""
        import onnxruntime as ort

        path = Path(path)
        contract = read_contract(path)
        if contract.get("onnx_sha256") and sha256_file(path) != contract["onnx_sha256"]:
            raise BundleError(f"{path}: the file's sha256 differs from {path.name}.json's: they were not "
                              "exported together")
        tokenizer = None
        if contract["base_kind"] == "text":
            tokenizer = _text_tokenizer(path, contract)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are noise to a user
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors for a damaged file
            raise BundleError(f"{path}: onnxruntime cannot open it ({str(e).splitlines()[0][:160]})") from None
        return cls(path, contract, session, tokenizer)

    # ---- inference -------------------------------------------------------------------------
    def outputs(self, xs: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """The network's output [N, C] logits (classifier) or [N, D] embeddings (encoder)."""
        xs = prediction_inputs(xs, self.kind)
        width = len(self.classes) if self.contract["kind"] == "classifier" else self.contract["feature_dim"]
        out = [self.session.run(None, self._feed(xs[i:i + batch_size]))[0] for i in range(0, len(xs), batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)

    def predict_proba(self, xs: Sequence[Any], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities [N, C] (softmax of the logits, as the bundle computes them)."""
        self._need_classifier("predict")
        logits = self.outputs(xs, batch_size).astype(np.float64)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)

    def predict(self, xs: Sequence[Any], batch_size: int = 64) -> list[str]:
        """Predicted label names."""
        return [self.classes[i] for i in self.predict_proba(xs, batch_size).argmax(-1).tolist()]

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings [N, D] from an encoder export."""
        if self.contract["kind"] != "encoder":
            raise BundleError(f"{self.path}: a classifier export gives logits; export with --encoder for embeddings")
        return self.outputs(texts, batch_size)

    def evaluate(self, data: Any, split: str | None = None, progress: bool = False) -> dict[str, Any]:
        """Accuracy, macro-F1, per-class F1 and the confusion matrix on a split (default: test, else val)."""
        self._need_classifier("evaluate")
        data, split, items, labels = evaluation_split(data, split, self.classes, self.contract.get("data_columns", {}))
        true = np.array(labels, dtype=np.int64)
        pred = self.predict_proba(items).argmax(-1)
        metrics = classification_metrics(pred, true, self.classes)
        metrics.update(split=split, skipped=len(data.skipped))
        return metrics

    # ---- preprocessing ---------------------------------------------------------------------
    def _feed(self, chunk: list[Any]) -> dict[str, np.ndarray]:
        if self.kind == "text":
            encodings = self.tokenizer.encode_batch([str(x) for x in chunk])
            fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
            return {name: np.array([getattr(e, fields[name]) for e in encodings], dtype=np.int64)
                    for name in self.contract["inputs"]}
        pixels = np.stack([image_tensor(x, self.contract["image"]) for x in chunk])
        return {self.contract["inputs"][0]: pixels}

    def _need_classifier(self, what: str) -> None:
        if self.contract["kind"] != "classifier":
            raise BundleError(f"{self.path}: an encoder export has no labels to {what}; use embed()")


def read_contract(path: str | Path) -> dict[str, Any]:
    """The contract JSON beside an .onnx file, checked; one BundleError line when it is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"no such ONNX file: {path}")
    beside = Path(f"{path}.json")
    if not beside.is_file():
        raise BundleError(f"{path}: its contract {beside.name} is missing (export with `headstart export BUNDLE "
                          "--onnx --out FILE.onnx` writes both)")
    try:
        contract = json.loads(beside.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{beside}: not readable JSON ({e})") from None
    if not isinstance(contract, dict) or contract.get("format") != CONTRACT_FORMAT:
        raise BundleError(f"{beside}: not a headstart ONNX contract (format {CONTRACT_FORMAT!r} expected)")
    needed = {"kind", "base_kind", "inputs", "classes"} | ({"text"} if contract.get("base_kind") == "text" else {"image"})
    missing = sorted(needed - set(contract))
    if missing or contract["kind"] not in ("classifier", "encoder"):
        raise BundleError(f"{beside}: a damaged contract (missing {', '.join(missing) or 'a known kind'})")
    return contract


def _text_tokenizer(path: Path, contract: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer

    text = contract["text"]
    file = path.parent / str(text.get("tokenizer")) / "tokenizer.json"
    if not file.is_file():
        raise BundleError(f"{path}: its tokenizer {file.parent.name}/tokenizer.json is missing")
    tokenizer = Tokenizer.from_file(str(file))
    # The bundle's collate: truncate at max_length, pad to the longest item of the batch.
    tokenizer.enable_truncation(max_length=int(text["max_length"]))
    tokenizer.enable_padding(direction=text.get("padding_side", "right"), pad_id=int(text["pad_id"]),
                             pad_token=text["pad_token"])
    return tokenizer


def image_tensor(image: Any, spec: dict[str, Any]) -> np.ndarray:
    """One image (a path or PIL image) -> the float32 [3, H, W] array the bundle's eval transform makes.

    timm's eval recipe, as torchvision runs it on PIL images: resize the short side to
    floor(size / crop_pct) (the long side scaled, truncated to an int), centre crop, /255, normalise.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        from ..data import load_image

        image = load_image(str(image))
    image = image if image.mode == "RGB" else image.convert("RGB")
    _, height, width = spec["input_size"]
    scale = math.floor(height / spec["crop_pct"]) if height == width else None
    if scale is None:  # timm keeps the ratio differently for non-square sizes; exports are square
        raise BundleError(f"non-square ONNX input size {spec['input_size']} is not supported")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = scale, int(scale * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        image = image.resize(size, _FILTERS.get(spec["interpolation"], 3))
    w, h = image.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    image = image.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.array(spec["mean"], dtype=np.float32)[:, None, None]
    std = np.array(spec["std"], dtype=np.float32)[:, None, None]
    return (pixels - mean) / std


def classification_metrics(pred: np.ndarray, true: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """`core.metrics.classification_metrics` in numpy (that one works on torch tensors)."""
    n_classes = len(classes)
    cm = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    cm = cm.astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    present = (support > 0) | (predicted > 0)
    n = int(cm.sum())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "examples": n,
        "per_class_f1": {c: round(float(f1[i]), 4) for i, c in enumerate(classes)},
        "confusion": cm.astype(np.int64).tolist(),
    }


def is_onnx(path: Any) -> bool:
    """Whether `path` names an exported .onnx file (what `commands` dispatches on)."""
    return isinstance(path, (str, Path)) and str(path).lower().endswith(".onnx")

