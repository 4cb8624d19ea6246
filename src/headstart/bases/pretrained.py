"""What a base is: `PretrainedCfg` (known before building, like timm's `pretrained_cfg`) and
`BaseInfo` (what a built base reports, and what a bundle manifest stores).

This module imports nothing heavy, so listing the registered bases never loads torch.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS: tuple[str, ...] = ("image", "text", "causal_lm")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PretrainedCfg:
    """The static facts of a registered base: everything `headstart bases` shows, without building it.

    A test builds every installed registered base (tiny ones included) and checks that kind, params,
    feature_dim, preprocessing, sha256, source and architecture equal the built base's `BaseInfo`,
    so these facts cannot drift from what `load_base` returns.

    >>> cfg = PretrainedCfg(kind="text", params=41952, feature_dim=32, preprocessing={"max_length": 128},
    ...                     sha256="0" * 64, license="apache-2.0", source="random", architecture="BertModel")
    >>> cfg.to_json()["feature_dim"]
    32
    """

    kind: str
    """One of `image`, `text`, `causal_lm`."""
    params: int
    """Parameters of the encoder as built (no source classifier; a tied LM head counts once)."""
    feature_dim: int
    """Width of the pooled feature vector that `forward` returns."""
    preprocessing: dict[str, Any]
    """Equal to the built base's `info.preprocessing`: mean/std/input_size/crop_pct/crop_mode/interpolation
    for images; tokenizer/vocab_size/max_length/padding/pooling for text and causal LMs."""
    sha256: str
    """sha256 of the weights file as shipped (the .pth, model.safetensors or .gguf), or of the seeded
    state dict for the tiny random bases: the value `BaseInfo.sha256` holds and bundles check."""
    license: str
    """Licence of the weights as a Hugging Face `license:` identifier (`apache-2.0`)."""
    source: str
    """Where the weights come from (package and file), as `BaseInfo.source` says it."""
    architecture: str
    """timm model name or transformers architecture."""
    description: str = ""
    """One line for listings; the builder's docstring when left empty."""
    hf_hub_id: str = ""
    """The Hugging Face hub model these weights come from, as a copy or a quantisation (a model card's
    `base_model`); '' when there is none."""
    origin_url: str = ""
    """Where the weights and their licence are published."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.params <= 0 or self.feature_dim <= 0:
            raise ValueError(f"params and feature_dim must be positive, got {self.params}, {self.feature_dim}")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not self.license:
            raise ValueError("license must name the weights' licence (e.g. 'apache-2.0')")

    def to_json(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))  # callers may edit the copy; the registry's facts stay put


@dataclass
class BaseInfo:
    """What a built base is, as stored in a bundle manifest (`to_json()`)."""

    name: str
    """Registry name (`efficientnet-lite0`) or the path / hub id the user passed."""
    kind: str
    """One of `image`, `text`, `causal_lm`."""
    params: int
    """Number of parameters of the encoder (without any source classifier)."""
    source: str
    """Where the weights come from (package, file, hub id, `random`)."""
    sha256: str
    """sha256 of the weights as loaded (file bytes where there is one file)."""
    feature_dim: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """Everything needed to turn raw input into tensors (mean/std/size or tokenizer/max_length)."""
    architecture: str = ""
    """timm model name or transformers architecture, for the model card."""
    license: str = ""
    """Licence of the weights (`apache-2.0`); '' when unknown (unregistered bases, older manifests)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_cfg(cls, name: str, cfg: PretrainedCfg) -> "BaseInfo":
        """The info a registered base will report once built, from its static facts."""
        return cls(name=name, kind=cfg.kind, params=cfg.params, source=cfg.source, sha256=cfg.sha256,
                   feature_dim=cfg.feature_dim, preprocessing=copy.deepcopy(cfg.preprocessing),
                   architecture=cfg.architecture, license=cfg.license)
