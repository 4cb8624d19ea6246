"""Bundle verbs the API does not offer as plain functions yet (predict top-k rows, info, generate, export).

Each is a typed function with its parameters documented, so the CLI generates its flags like any other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def predict(bundle: str, inputs: list[str], top_k: int = 1) -> list[dict[str, Any]]:
    """Predict labels for image files or texts.

    Args:
        bundle: a classifier bundle folder (written by `fit --out`)
        inputs: image files (image specialists) or texts (text specialists)
        top_k: list this many labels per input, best first
    """
    from ..api import load

    spec = load(bundle)
    if not hasattr(spec, "predict_proba"):
        from ..core.errors import BundleError

        raise BundleError(f"{bundle} is a generator bundle; `predict` needs a classifier bundle (use `generate`)")
    probs = spec.predict_proba(inputs)
    k = max(1, min(top_k, len(spec.classes)))
    rows = []
    for x, p in zip(inputs, probs):
        top = p.topk(k)
        rows.append({"input": x, "label": spec.classes[top.indices[0]], "score": round(float(top.values[0]), 4),
                     "top": [{"label": spec.classes[i], "score": round(float(s), 4)}
                             for s, i in zip(top.values.tolist(), top.indices.tolist())]})
    return rows


def info(bundle: str) -> dict[str, Any]:
    """Show what a bundle holds: base, method and config, labels, metrics, files.

    Args:
        bundle: a bundle folder
    """
    from ..bundle import read_manifest

    return read_manifest(bundle)


def generate(bundle: str, prompt: str, **options: Any) -> str:
    """Answer a prompt with an sft/dpo bundle; `stream` (in options) receives the text as it is produced."""
    from ..api import load
    from ..core.errors import BundleError

    spec = load(bundle)
    if not hasattr(spec, "generate"):
        raise BundleError(f"{bundle} is a classifier bundle; `generate` needs an sft/dpo bundle")
    return spec.generate(prompt, **options)


def export(bundle: str, out: str, merged: bool = False) -> Path:
    """Export an sft/dpo bundle as a plain transformers model folder with the adapter merged in.

    Args:
        bundle: an sft/dpo bundle folder
        out: folder for the transformers model (config, safetensors, tokenizer)
        merged: merge the adapter into the full-precision base (the only export so far)
    """
    from ..api import load
    from ..core.errors import BundleError

    spec = load(bundle)
    if not merged or not hasattr(spec, "export_merged"):
        why = "only --merged exports exist so far" if merged is False else f"{bundle} is a classifier bundle"
        raise BundleError(f"cannot export {bundle}: {why}; `export --merged` needs an sft/dpo bundle")
    return spec.export_merged(out)
