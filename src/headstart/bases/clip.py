"""Image bases with a text tower (CLIP, SigLIP): image features plus texts in the same space.

The backbone's module tree is the VISION tower only (`vision_model` + `visual_projection`):
that is what methods train, count, partition into blocks and store in bundles. The text tower
and the logit scale/bias stay outside the module tree, frozen and in eval mode, reachable
through `clip_model` (the whole transformers model) and used by `encode_text` and zero-shot.
Like the timm source classifier in image.py, they move with `.to()` all the same.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .backbone import Backbone, BaseInfo
from .image import _eval_transform, _rgb, _train_transform, image_preprocessing
from .structure import leftover_modules, suffix_targets
from .weights import quiet_weight_loading, weights_sha256

CLIP_TYPES = ("clip", "siglip")
"""config.json `model_type`s loaded as image-text bases (resolve.py routes them here)."""
CLIP_ARCHITECTURES = ("CLIPModel", "SiglipModel")

# What CLIPImageProcessor / SiglipImageProcessor do when a folder has no preprocessor_config.json.
_DEFAULTS = {
    "clip": {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
             "crop_mode": "center"},
    "siglip": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_mode": "squash"},
}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL codes
_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


class ClipBackbone(Backbone):
    """A transformers CLIPModel / SiglipModel; `forward(pixel_values)` -> projected image embedding [B, D].

    `encode_text(texts)` -> [N, D] in the same space (un-normalised, like `forward`): cosine
    similarity times `logit_scale()` (+ `logit_bias()` for SigLIP) is the model's own logit.
    `processor` is the folder's preprocessor_config.json (mean/std/size/resample); missing values
    take the CLIP (or SigLIP) processor's defaults.

    >>> base = load_base("tiny-clip")
    >>> base(**base.collate([Image.new("RGB", (40, 30))])).shape, base.encode_text(["a cat"]).shape
    (torch.Size([1, 16]), torch.Size([1, 16]))
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str, source: str, sha256: str,
                 processor: dict[str, Any] | None = None) -> None:
        super().__init__()
        model.eval()
        model.requires_grad_(False)  # the text tower and logit scale/bias: frozen for good
        self.vision_model = model.vision_model
        # SigLIP pools with its attention head inside vision_model: no separate projection.
        self.visual_projection = getattr(model, "visual_projection", None) or nn.Identity()
        self.requires_grad_(True)  # the vision side trains like any image base
        object.__setattr__(self, "clip_model", model)  # not registered: see the module docstring
        self.tokenizer = tokenizer
        config = model.config
        self.model_type = config.model_type
        text_config = config.text_config
        # SigLIP pools the LAST token and was trained on sequences padded to full length, unmasked.
        self.pad_to_max = self.model_type == "siglip"
        self.text_max_length = int(text_config.max_position_embeddings)
        self.native_size = int(config.vision_config.image_size)
        self._interpolate = False
        feature_dim = (self.visual_projection.out_features if isinstance(self.visual_projection, nn.Linear)
                       else int(config.vision_config.hidden_size))
        self.info = BaseInfo(
            name=name,
            kind="image",
            params=sum(p.numel() for p in self.parameters()),  # the vision tower: what methods train
            source=source,
            sha256=sha256,
            feature_dim=int(feature_dim),
            architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        )
        self._set_data_config(_data_config(self.model_type, self.native_size, processor or {}))

    def _set_data_config(self, cfg: dict[str, Any]) -> None:
        self.data_config = cfg
        self.info.preprocessing = {
            **image_preprocessing(cfg),
            "text_tokenizer": type(self.tokenizer).__name__,
            "text_max_length": self.text_max_length,
            "text_padding": "max_length" if self.pad_to_max else "longest",
        }
        self._eval_tf = _eval_transform(cfg)
        self._train_tf = _train_transform(cfg, min_scale=0.6)  # CLIP-style crops keep more of the image

    def set_input_size(self, size: int) -> None:
        """Run at `size` x `size` pixels: the position embeddings are interpolated (bicubic) to the new grid.

        Zero-shot quality is best at the native size; fine-tuning adapts to the new one.
        """
        if size < 32:
            raise ValueError(f"image size must be >= 32 pixels, got {size}")
        self._interpolate = int(size) != self.native_size
        self._set_data_config({**self.data_config, "input_size": (3, int(size), int(size))})

    # -- preprocessing -------------------------------------------------------------------
    def collate(self, items: Sequence[Any], train: bool = False) -> dict[str, torch.Tensor]:
        """PIL images -> {"pixel_values": [B, 3, H, W]}.

        Eval: the model's own processor (CLIP: resize the short side + centre crop; SigLIP:
        resize to the square). Train: RandomResizedCrop(scale 0.6-1) + horizontal flip; milder
        than image.py's 0.5 because a pretrained ViT has no translation equivariance to fall back on.
        """
        tf = self._train_tf if train else self._eval_tf
        return {"pixel_values": torch.stack([tf(_rgb(im)) for im in items])}

    def tokenize_text(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> the text tower's inputs (SigLIP: ids padded to `text_max_length`, no mask)."""
        enc = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max else True, truncation=True,
                             max_length=self.text_max_length, return_tensors="pt")
        keys = ("input_ids",) if self.pad_to_max else ("input_ids", "attention_mask")
        return {k: enc[k] for k in keys}

    # -- model ---------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, D]
        pooled = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=self._interpolate).pooler_output
        return self.visual_projection(pooled)

    @property
    def has_text_tower(self) -> bool:
        return True

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:  # [N, D]
        """Texts -> projected text embeddings (un-normalised), in the space of `forward`'s features."""
        texts = list(texts)
        device = self.clip_model.logit_scale.device
        out = []
        for i in range(0, len(texts), batch_size):
            batch = {k: v.to(device) for k, v in self.tokenize_text(texts[i:i + batch_size]).items()}
            out.append(self.clip_model.get_text_features(**batch).pooler_output.float())
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim)

    def logit_scale(self) -> float:
        """exp(learned logit scale): CLIP ~100. logits = logit_scale() * cos(image, text) + logit_bias()."""
        return float(self.clip_model.logit_scale.detach().exp())

    def logit_bias(self) -> float:
        """SigLIP's learned bias (its logits go through a sigmoid); 0.0 for CLIP."""
        bias = getattr(self.clip_model, "logit_bias", None)
        return float(bias.detach()) if bias is not None else 0.0

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        # .to()/.half() must move the unregistered text tower (and logit scale/bias) along.
        super()._apply(fn, recurse)
        vision = {id(self.vision_model), id(self.visual_projection)}
        self.clip_model._apply(fn, recurse=False)
        for child in self.clip_model.children():
            if id(child) not in vision:
                child._apply(fn)
        return self

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """embeddings (+ CLIP's pre-layernorm), one block per encoder layer, then everything above them."""
        v = self.vision_model
        stem = [v.embeddings] + ([v.pre_layrnorm] if hasattr(v, "pre_layrnorm") else [])
        out: list[tuple[str, nn.Module]] = [("embeddings", nn.ModuleList(stem))]
        out += [(f"layers.{i}", layer) for i, layer in enumerate(v.encoder.layers)]
        # post-layernorm + visual projection (CLIP) or attention-pooling head (SigLIP)
        out.append(("head", leftover_modules(self, [b for _, b in out])))
        return out

    def lora_target_modules(self) -> list[str]:
        """The vision encoder's attention projections (q/k/v/out_proj), never the text tower's.

        Computed over the whole image-text model, so the text layers' identical names force full
        dotted names (`vision_model.encoder.layers.0.self_attn.q_proj`): the list stays correct
        even applied to `clip_model` itself. SigLIP's pooling head (an nn.MultiheadAttention,
        which bypasses its out_proj's forward) is left alone.
        """

        def wanted(name: str, module: nn.Module) -> bool:
            return (isinstance(module, nn.Linear) and name.startswith("vision_model.encoder.")
                    and name.rsplit(".", 1)[-1] in _ATTENTION)

        return suffix_targets(self.clip_model, wanted)


def _data_config(model_type: str, size: int, processor: dict[str, Any]) -> dict[str, Any]:
    """timm-style data config (what image.py's transforms take) from a transformers image processor config."""
    default = _DEFAULTS.get(model_type, _DEFAULTS["clip"])
    resize = processor.get("size")
    crop_mode, crop_pct = default["crop_mode"], 1.0
    if isinstance(resize, dict) and "height" in resize:  # resize straight to H x W (SigLIP)
        crop_mode = "squash"
    elif resize is not None:  # resize the short side, then centre-crop (CLIP)
        short = resize.get("shortest_edge", size) if isinstance(resize, dict) else resize
        crop = processor.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else crop
        crop_mode, crop_pct = "center", float(crop) / float(short)
    return {
        "input_size": (3, size, size),
        "interpolation": _RESAMPLE.get(processor.get("resample", 3), "bicubic"),
        "mean": tuple(processor.get("image_mean", default["mean"])),
        "std": tuple(processor.get("image_std", default["std"])),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }


def is_clip_config(config: dict[str, Any]) -> bool:
    """Whether a config.json describes an image-text model this module loads."""
    architectures = set(config.get("architectures") or [])
    return config.get("model_type") in CLIP_TYPES or bool(architectures & set(CLIP_ARCHITECTURES))


def load_clip_folder(folder: str | Path, *, name: str, source: str | None = None,
                     pretrained: bool = True) -> ClipBackbone:
    """A local CLIP / SigLIP folder (config.json, weights, tokenizer, preprocessor_config.json) as an image base.

    `pretrained=False` keeps the architecture, tokenizer and preprocessing with random weights.

    >>> base = load_clip_folder(hub_snapshot("openai/clip-vit-base-patch32"), name="openai/clip-vit-base-patch32")
    >>> base.feature_dim, round(base.logit_scale())
    (512, 100)
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if pretrained:
        with quiet_weight_loading():
            model = AutoModel.from_pretrained(folder, config=config, dtype=torch.float32)
    else:
        model = AutoModel.from_config(config, dtype=torch.float32)
    try:
        processor = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        processor = {}
    return ClipBackbone(model, AutoTokenizer.from_pretrained(folder), name=name,
                        source=(source or str(folder)) if pretrained else "random init",
                        sha256=weights_sha256(folder), processor=processor)
