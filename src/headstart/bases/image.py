"""Image bases: any timm model as a backbone giving pooled pre-logits features.

The model runs in `channels_last` memory format: measured 2-4x faster than NCHW for these
depthwise-conv networks on CPU, so `collate` hands out channels_last batches too.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from .backbone import Backbone, BaseInfo
from .structure import leftover_modules, suffix_targets


INFERENCE_ACTIVATIONS = 576 << 20
"""Activation bytes one inference forward may hold: 16 images of efficientnet-lite0 at 288 px. Bigger batches
run faster on CPU (64 images took 0.7x the time per image of 16, glibc tuning on, 2 cores) but memory grows
with the batch (64 images: 3.2 GB peak, 16: 1.4 GB): this keeps a probe within a laptop's 1.5 GB."""
ALLOCATOR_SLACK = 1.5
"""Resident bytes per live activation byte, measured (glibc's arenas keep freed buffers for reuse)."""

FEATURE_VIEWS = {
    "pooled": "the base's own pooled output (what it was pre-trained to give)",
    "flip": "the mean of the pooled outputs of the photo and its mirror image (test-time augmentation built in)",
    "stages": "flip, and the pooled output of the last stage before the head beside it, each L2-normalised "
              "(mid-level texture and colour: fine-grained classes)",
}
"""Feature views (`set_feature_view`; a probe's `image_features`). Measured with a probe at 8 shots/class over
5 seeds (`bench/shots.py --groups views`, README "Image feature views"): `stages` lifts fine-grained flowers17
(lite2: 0.883 -> 0.906) and never helps hymenoptera's ants vs bees, so `pooled` stays the default."""


def feature_view_of(preprocessing: dict[str, Any]) -> str:
    """The feature view a base ran with, from its (or a bundle's) preprocessing record."""
    return str(preprocessing.get("features", "pooled"))


class TimmImageBackbone(Backbone):
    """A timm model without its classifier; `forward(pixel_values)` -> [B, num_features].

    The pre-training classifier (e.g. the 1000-class ImageNet head) is kept outside the module
    tree: it is not a backbone parameter (not counted, not in `state_dict`, never trained by
    mistake) but stays reachable through `source_classifier()` for zero-shot use.

    >>> import timm
    >>> base = TimmImageBackbone(timm.create_model("test_efficientnet"), name="t", source="random", sha256="x")
    >>> base(**base.collate([Image.new("RGB", (80, 60))])).shape
    torch.Size([1, 256])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        source: str,
        sha256: str,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        from timm.data import resolve_data_config

        classifier = model.get_classifier()
        has_head = isinstance(classifier, nn.Module) and any(True for _ in classifier.parameters())
        model.reset_classifier(0)  # replaces the head by Identity: features come out pre-logits
        self.model = model.to(memory_format=torch.channels_last)
        # object.__setattr__ skips nn.Module registration: see the class docstring.
        object.__setattr__(self, "_source_classifier", classifier if has_head else None)

        cfg = dict(resolve_data_config({}, model=model))
        if input_size is not None:
            cfg["input_size"] = (3, input_size, input_size)
        self.info = BaseInfo(
            name=name,
            kind="image",
            params=sum(p.numel() for p in self.model.parameters()),
            source=source,
            sha256=sha256,
            feature_dim=int(model.num_features),
            preprocessing={},
            architecture=str(model.pretrained_cfg.get("architecture", type(model).__name__)),
        )
        self._example_bytes: dict[tuple, int] = {}
        self.feature_view = "pooled"
        self._set_data_config(cfg)

    def _set_data_config(self, cfg: dict[str, Any]) -> None:
        self.data_config = cfg
        self.info.preprocessing = image_preprocessing(cfg)
        if self.feature_view != "pooled":  # a view is preprocessing too: bundles and feature caches record it
            self.info.preprocessing["features"] = self.feature_view
        self._eval_tf = _eval_transform(cfg)
        self._train_tf = _train_transform(cfg)

    def set_input_size(self, size: int) -> None:
        """Train and predict at `size` x `size` pixels instead of the pre-training resolution.

        Convolutional bases accept any size; fine-tuning above the pre-training resolution is
        BiT's and FixRes' recipe for photos whose objects are small (hymenoptera: 224 -> 288 px
        lifts the lite0 probe from 0.948 to 0.967 on val). Costs (size / native)^2 more compute.
        """
        if size < 32:
            raise ValueError(f"image size must be >= 32 pixels, got {size}")
        self._set_data_config({**self.data_config, "input_size": (3, int(size), int(size))})

    def set_feature_view(self, view: str) -> None:
        """Make the features `view` (FEATURE_VIEWS): what the head sees, for training and prediction alike."""
        if view not in FEATURE_VIEWS:
            raise ValueError(f"unknown feature view {view!r}; choose one of: {', '.join(FEATURE_VIEWS)}")
        if view == "stages" and not self._staged():
            raise ValueError(f"{self.info.name} has no EfficientNet-style stages: the 'stages' view needs them")
        self.feature_view = view
        self.info.feature_dim = int(self.model.num_features) + (self._last_stage_dim() if view == "stages" else 0)
        self._example_bytes.clear()
        self._set_data_config(self.data_config)

    def _last_stage_dim(self) -> int:
        info = getattr(self.model, "feature_info", [])  # timm's per-stage record: channels of each stage
        chs = [f["num_chs"] for f in info if f.get("module") == self._view_stage()]
        if not chs:
            raise ValueError(f"{self.info.name} does not say how wide its last stage is: no 'stages' view")
        return int(chs[0])

    def _view_stage(self) -> str:
        return f"blocks.{len(self.model.blocks) - 1}"

    # -- preprocessing -------------------------------------------------------------------
    def collate(self, items: Sequence[Any], train: bool = False) -> dict[str, torch.Tensor]:
        """PIL images -> {"pixel_values": [B, 3, H, W] channels_last float tensor}.

        Eval: timm's recipe (resize the short side to size / crop_pct, centre crop, normalise).
        Train: RandomResizedCrop(scale 0.5-1) + horizontal flip; randomness comes from torch's
        global RNG, so seeding torch makes augmentation reproducible.
        """
        tf = self._train_tf if train else self._eval_tf
        batch = torch.stack([tf(_rgb(im)) for im in items])
        return {"pixel_values": batch.contiguous(memory_format=torch.channels_last)}

    # -- model ---------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, D]
        # Training (any module in train mode: AdaBN's BatchNorms average over exactly the batch given) or
        # gradients: the caller sized the batch. Tracing and exporting need the plain graph. A LoRA model
        # may route rows to adapters by position (PEFT's adapter_names): it needs the whole batch.
        if torch.is_grad_enabled() or _exporting() or any(m.training or hasattr(m, "lora_A")
                                                           for m in self.model.modules()):
            return self._features(pixel_values)
        # Inference holds one layer's activations at a time, so any caller's batch (predict, evaluate,
        # serve) runs in parts of INFERENCE_ACTIVATIONS: the same features in bounded memory.
        part = max(1, INFERENCE_ACTIVATIONS // self.example_bytes())
        if len(pixel_values) <= part:
            return self._features(pixel_values)
        return torch.cat([self._features(chunk) for chunk in pixel_values.split(part)])

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.feature_view == "pooled":
            return self._pooled(pixel_values)
        mirrored = pixel_values.flip(-1)
        if self.feature_view == "flip":
            return (self._pooled(pixel_values) + self._pooled(mirrored)) / 2
        stage = self._view_stage()
        a, b = self.layer_features(pixel_values), self.layer_features(mirrored)
        return torch.cat([nn.functional.normalize((a[k] + b[k]) / 2, dim=-1) for k in ("final", stage)], dim=-1)

    def _pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(pixel_values)
        return self.model.forward_head(x, pre_logits=True)

    def example_bytes(self) -> int:
        """Peak bytes one image adds to an inference forward at the current input size, measured once per
        size on a blank image: the largest layer's input plus output, plus the largest output again (a
        block's shortcut is held while its body runs), times ALLOCATOR_SLACK, plus the image itself."""
        size = tuple(self.data_config["input_size"])
        if size not in self._example_bytes:
            largest_io, largest_out = [0], [0]

            def record(module, inputs, output):
                if torch.is_tensor(output):
                    seen = sum(t.nbytes for t in inputs if torch.is_tensor(t)) + output.nbytes
                    largest_io[0], largest_out[0] = max(largest_io[0], seen), max(largest_out[0], output.nbytes)

            handles = [m.register_forward_hook(record) for m in self.model.modules() if next(m.children(), None) is None]
            modes = [(m, m.training) for m in self.modules()]  # each module's own mode comes back (AdaBN)
            try:
                self.eval()
                with torch.no_grad():
                    self._features(torch.zeros(1, *size).contiguous(memory_format=torch.channels_last))
            finally:
                for h in handles:
                    h.remove()
                for m, training in modes:
                    m.training = training
            pixels = 4 * size[0] * size[1] * size[2]
            self._example_bytes[size] = int(ALLOCATOR_SLACK * (largest_io[0] + largest_out[0])) + pixels
        return self._example_bytes[size]

    def _staged(self) -> bool:
        return all(hasattr(self.model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))

    def feature_layers(self) -> list[str]:
        """EfficientNet-style models: the output of every stage (`blocks.0` ..), then "final"."""
        if not self._staged():
            return ["final"]
        return [f"blocks.{i}" for i in range(len(self.model.blocks))] + ["final"]

    def layer_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._staged():
            return {"final": self(pixel_values)}
        m = self.model  # the steps of timm's EfficientNet.forward_features, keeping each stage's output
        x = m.bn1(m.conv_stem(pixel_values))
        out = {}
        for i, stage in enumerate(m.blocks):
            x = stage(x)
            out[f"blocks.{i}"] = x.mean(dim=(2, 3))  # global average pool: [B, C_stage]
        out["final"] = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        return out

    def source_classifier(self) -> nn.Module | None:
        return self._source_classifier

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        # .to()/.half() must move the unregistered source classifier along with the backbone.
        super()._apply(fn, recurse)
        if self._source_classifier is not None:
            self._source_classifier._apply(fn)
        return self

    def blocks(self) -> list[tuple[str, nn.Module]]:
        m = self.model
        if self._staged():
            # EfficientNet / MobileNet family: stem, one block per stage, head conv.
            out: list[tuple[str, nn.Module]] = [("stem", nn.ModuleList([m.conv_stem, m.bn1]))]
            out += [(f"blocks.{i}", stage) for i, stage in enumerate(m.blocks)]
            out.append(("head", nn.ModuleList([m.conv_head, m.bn2])))
        else:
            out = _timm_groups(m)
        rest = leftover_modules(m, [b for _, b in out])
        if len(rest):  # anything the layout above missed still gets exactly one block
            name, last = out[-1]
            out[-1] = (name, nn.ModuleList([last, *rest]))
        return out

    def lora_target_modules(self) -> list[str]:
        """The dense 1x1 convs (`conv_pw`, `conv_pwl`, `conv_head` in EfficientNets).

        Depthwise convs have too few weights per channel for a low-rank update to help, and
        squeeze-excite convs are gates, not features.
        """

        def wanted(name: str, mod: nn.Module) -> bool:
            return (
                isinstance(mod, nn.Conv2d)
                and mod.groups == 1
                and tuple(mod.kernel_size) == (1, 1)
                and ".se." not in f".{name}."
            )

        targets = suffix_targets(self.model, wanted)
        if not targets:  # e.g. a ViT: adapt its Linear layers instead
            targets = suffix_targets(self.model, lambda n, mod: isinstance(mod, nn.Linear))
        return targets


def _exporting() -> bool:
    """Tracing or exporting (ONNX, torch.compile): the graph must be the plain forward, with no batch split."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode == "RGB" else im.convert("RGB")


def image_preprocessing(cfg: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of a timm data config: what turns a decoded image into the input tensor."""
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "input_size": list(cfg["input_size"]), "crop_pct": float(cfg["crop_pct"]),
            "crop_mode": cfg.get("crop_mode", "center"), "interpolation": cfg["interpolation"]}


def _eval_transform(cfg: dict[str, Any]) -> Callable:
    from timm.data import create_transform

    return create_transform(**cfg, is_training=False)


def _train_transform(cfg: dict[str, Any], min_scale: float = 0.5) -> Callable:
    """Light augmentation: a random crop of at least `min_scale` of the image, resized, and a flip."""
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms as T  # here, not at import: text-only runs never pay for torchvision

    size = cfg["input_size"][1:]
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=str_to_interp_mode(cfg["interpolation"])),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


def _timm_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks for any other timm model, from its own `group_matcher` (what timm uses for LLRD)."""
    from timm.models import group_modules

    groups = group_modules(model, model.group_matcher(coarse=True))
    modules = dict(model.named_modules())
    return [(f"group.{gid}", nn.ModuleList([modules[n] for n in names])) for gid, names in sorted(groups.items())]
