"""A classifier bundle as one ONNX file plus the contract that says how to feed it.

    x.onnx            the network: LoRA merged into the base, the head included; output `logits` [B, C]
                      (or `embeddings` [B, D] with `encoder=True`)
    x.onnx.json       the preprocessing contract: kind, classes, input names, tokenizer folder or image
                      size/mean/std/resize, max length, headstart version, the source bundle's sha256s
    x.onnx.tokenizer/ text bases: the fast tokenizer (`tokenizer.json`), so prediction needs only
                      `tokenizers` + onnxruntime (`onnx_runtime.OnnxSpecialist`), never torch

The network is traced with `torch.onnx.export(dynamo=False)`: the TorchScript path exports BERT
and timm's EfficientNets (TF "same" padding becomes constant pads at the fixed image size) in a few
seconds; the dynamo path of torch 2.14 fails on BERT (with or without PEFT). Text inputs have
a dynamic batch and length; image inputs a dynamic batch at the bundle's image size.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import BundleError, ConfigError
from ..core.storage import atomic_dir, atomic_write_text, sha256_file
from .classifier import Specialist

CONTRACT_FORMAT = "headstart-onnx"
CONTRACT_VERSION = 1
OPSET = 17
CONTRACT_SUFFIX = ".json"
TOKENIZER_SUFFIX = ".tokenizer"
PARITY_TOLERANCE = 1e-4


def contract_path(onnx_file: str | Path) -> Path:
    """`x.onnx` -> `x.onnx.json`."""
    return Path(f"{onnx_file}{CONTRACT_SUFFIX}")


def tokenizer_path(onnx_file: str | Path) -> Path:
    """`x.onnx` -> `x.onnx.tokenizer/`."""
    return Path(f"{onnx_file}{TOKENIZER_SUFFIX}")


def export_onnx(spec: Specialist, out: str | Path, *, int8: bool = False, encoder: bool = False,
                source: Path | None = None) -> Path:
    """Write `spec` as `out` (an `.onnx` file) with its contract JSON (and tokenizer folder) beside it.

    spec: a loaded classifier specialist (its head already picked).
    out: the `.onnx` file to write; `out.json` and, for text, `out.tokenizer/` are written beside it.
    int8: quantize the weights to int8 (onnxruntime dynamic quantization; text bases only).
    encoder: export the base's pooled features (`embeddings`) instead of the head's logits.
    source: the bundle folder it came from (its files' sha256s go into the contract).

    >>> export_onnx(headstart.load("runs/trec-ft"), "trec.onnx", int8=True)
    PosixPath('trec.onnx')
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out must name an .onnx file, got {out}")
    base = spec.model.base
    _check_exportable(spec, base, int8)
    model, names, sample = _traceable(spec, base, encoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
        traced = Path(tmp) / "model.onnx"
        _trace(model, names, sample, traced, "embeddings" if encoder else "logits", base.kind)
        parity = _parity(model, sample, traced)
        if parity > PARITY_TOLERANCE:  # a silent mismatch here would ship wrong answers
            raise BundleError(f"the ONNX network differs from the bundle by {parity:.2g} (> {PARITY_TOLERANCE}); "
                              "not written")
        if int8:
            traced = _quantize(traced, Path(tmp) / "model.int8.onnx")
        contract = _contract(spec, base, names, encoder, int8, source, parity)
        if base.kind == "text":
            with atomic_dir(tokenizer_path(out)) as folder:
                base.tokenizer.save_pretrained(str(folder))
                if not (folder / "tokenizer.json").is_file():
                    raise BundleError(f"{base.info.name}'s tokenizer has no fast (tokenizer.json) form")
            contract["text"]["tokenizer"] = tokenizer_path(out).name
        os.replace(traced, out)
        contract["onnx_sha256"] = sha256_file(out)
        # The contract is written last: an .onnx without its JSON is refused on load, so a kill
        # before this line never leaves a pair that looks whole.
        atomic_write_text(contract_path(out), json.dumps(contract, indent=2))
    return out


def _check_exportable(spec: Any, base: Any, int8: bool) -> None:
    from ..bases.image import TimmImageBackbone
    from ..bases.text import HFTextBackbone
    from ..methods.base import SpecialistModel

    where = spec.folder or "this specialist"
    if not isinstance(spec, Specialist) or not isinstance(spec.model, SpecialistModel):
        raise BundleError(f"{where}: only classifier bundles with a linear head export to ONNX "
                          f"(this one is a {getattr(spec, 'bundle_kind', type(spec).__name__)} "
                          f"{spec.manifest['method']['name']} bundle)")
    if not isinstance(base, (HFTextBackbone, TimmImageBackbone)):
        raise BundleError(f"{where}: its base {base.info.name} ({type(base).__name__}) has no ONNX export; "
                          "text encoders (minilm-l6) and timm image bases (efficientnet-lite) do")
    if int8 and base.kind == "image":
        raise ConfigError(f"{where}: --int8 is for text bases; dynamic int8 quantization of an image base's "
                          "convolutions is refused (it needs calibration to keep accuracy): export it in fp32")
    if base.kind == "image" and base.data_config.get("crop_mode", "center") != "center":
        raise BundleError(f"{where}: image crop mode {base.data_config['crop_mode']!r} has no ONNX contract "
                          "(only 'center')")


class _Exportable(nn.Module):
    """Positional tensors in the contract's input order -> logits (or features)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors)))


def _traceable(spec: Specialist, base: Any, encoder: bool) -> tuple[nn.Module, list[str], tuple]:
    """A float32 eval copy with any LoRA merged into the base weights, its input names and a sample."""
    model = copy.deepcopy(spec.model).float().eval()  # the loaded specialist stays as it was
    if hasattr(model.backbone, "merge_and_unload"):  # a PEFT wrapper: fold the adapter into the weights
        try:
            model.backbone = model.backbone.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError, TypeError) as e:
            raise BundleError(f"{spec.folder}: its adapter cannot be merged into the base for ONNX "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if base.kind == "image":
        model = model.to(memory_format=torch.contiguous_format)  # ONNX sees plain NCHW either way
        sample = base.collate([_sample_image(base)] * 2, False)
        sample = {k: v.contiguous() for k, v in sample.items()}
    else:
        sample = base.collate(["headstart exports this sentence", "a shorter one"], False)
    names = list(sample)
    inner = model.backbone if encoder else model
    return _Exportable(inner, names).eval(), names, tuple(sample.values())


def _sample_image(base: Any):
    from PIL import Image

    _, h, w = base.data_config["input_size"]
    return Image.new("RGB", (w + 7, h + 3), (120, 80, 40))


def _trace(model: nn.Module, names: list[str], sample: tuple, path: Path, output: str, kind: str) -> None:
    axes = {name: ({0: "batch", 1: "sequence"} if kind == "text" else {0: "batch"}) for name in names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript tracer warnings about Python control flow in HF code
        torch.onnx.export(model, sample, str(path), dynamo=False, input_names=names, output_names=[output],
                          dynamic_axes={**axes, output: {0: "batch"}}, opset_version=OPSET, do_constant_folding=True)


def _parity(model: nn.Module, sample: tuple, path: Path) -> float:
    """Max |difference| between torch and onnxruntime on the trace sample."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(*sample).float().numpy()
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), sample)})[0]
    return float(abs(got - expected).max())


def _quantize(path: Path, out: Path) -> Path:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only the encoder's weight MatMuls, per output channel: measured on a minilm-l6 trec LoRA bundle,
    # 99.2% label agreement (per-tensor: 88.8%). The head stays float: a probe head's weights are large
    # (norm ~90 over features of norm ~6), so int8 there alone moved logits by ~1 and flipped 10% of
    # labels. Listing the nodes also keeps onnxruntime off the head's Gemm, which it quantizes even
    # when told to exclude it.
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    encoder = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
               and not n.name.startswith("/model/head/")]
    root = logging.getLogger()  # onnxruntime logs a hint about static quantization at every call: hidden
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=encoder)
    finally:
        root.setLevel(level)
    return out


def _contract(spec: Specialist, base: Any, names: list[str], encoder: bool, int8: bool, source: Path | None,
              parity: float) -> dict[str, Any]:
    from .. import __version__
    from .commands import pipeline_task

    m = spec.manifest
    contract: dict[str, Any] = {
        "format": CONTRACT_FORMAT, "format_version": CONTRACT_VERSION,
        "kind": "encoder" if encoder else "classifier", "base_kind": base.kind,
        "task": "feature-extraction" if encoder else pipeline_task(m),
        "classes": None if encoder else list(spec.classes),
        "inputs": names, "output": "embeddings" if encoder else "logits",
        "feature_dim": base.feature_dim, "int8": int8, "opset": OPSET,
        "base": {"name": m["base"]["name"], "sha256": m["base"]["sha256"]},
        "method": m["method"]["name"], "headstart_version": __version__,
        "data_columns": m.get("data", {}).get("columns", {}),  # how `evaluate` reads a table
        "export_check": {"max_abs_diff_fp32": parity},
        "bundle": _bundle_hashes(source),
    }
    if base.kind == "text":
        tok = base.tokenizer
        contract["text"] = {"tokenizer": None, "max_length": int(base.max_length),
                            "padding_side": tok.padding_side, "pad_id": int(tok.pad_token_id),
                            "pad_token": str(tok.pad_token), "normalized_features": bool(base.normalize)}
    else:
        cfg = base.data_config
        contract["image"] = {"input_size": [int(v) for v in cfg["input_size"]],
                             "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
                             "crop_pct": float(cfg["crop_pct"]), "crop_mode": cfg.get("crop_mode", "center"),
                             "interpolation": str(cfg["interpolation"]), "layout": "NCHW", "scale": 1 / 255}
    return contract


def _bundle_hashes(folder: Path | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "plots" not in p.relative_to(folder).parts)
    return {"path": str(folder), "files": {str(p.relative_to(folder)): sha256_file(p) for p in files}}

