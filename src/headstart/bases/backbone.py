"""The one backbone interface every method, ranking and serving path uses.

A backbone turns raw examples (decoded PIL images or strings) into a batch of tensors
(`collate`) and a batch into one pooled feature vector per example (`forward`).
Methods never look inside a backbone beyond `blocks()` (ordered bottom -> top, for
partial fine-tuning and layer-wise learning rates) and `lora_target_modules()`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .pretrained import KINDS, BaseInfo  # noqa: F401  (re-exported: older code imports them from here)


class Backbone(nn.Module):
    """A frozen-or-trainable encoder with its own preprocessing.

    Subclasses set `info` and implement `collate`, `forward`, `blocks`, `lora_target_modules`.
    """

    info: BaseInfo

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def feature_dim(self) -> int:
        return self.info.feature_dim

    def collate(self, items: Sequence[Any], train: bool = False) -> dict[str, torch.Tensor]:
        """Raw examples -> batch dict of tensors. `train` switches on augmentation (images)."""
        raise NotImplementedError

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:  # [B, feature_dim]
        raise NotImplementedError

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Named stages ordered from input to output (stem/embeddings first, last stage last).

        Every trainable parameter of the backbone belongs to exactly one block, so
        "unfreeze the top N blocks" and layer-wise LR decay are well defined.
        """
        raise NotImplementedError

    def lora_target_modules(self) -> list[str]:
        """Names (PEFT `target_modules` suffixes) of the layers LoRA adapts."""
        raise NotImplementedError

    def set_input_size(self, size: int) -> None:
        """Change the input resolution (image bases only)."""
        raise ValueError(f"{self.info.name} is a {self.kind} base: it has no image size")

    def set_feature_view(self, view: str) -> None:
        """Change what the features are made of (image bases only: `bases/image.py` FEATURE_VIEWS)."""
        if view != "pooled":
            raise ValueError(f"{self.info.name} ({self.kind} base) offers only the 'pooled' feature view")

    @property
    def has_text_tower(self) -> bool:
        """Whether `encode_text` puts texts in the same space as `forward`'s features."""
        return self.kind in ("text", "causal_lm")

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:  # [N, feature_dim]
        """Texts -> features comparable with this base's features: text encoders embed them with
        themselves; image bases need a text tower (CLIP/SigLIP-style bases override this)."""
        if not self.has_text_tower:
            raise ValueError(f"{self.info.name} is a {self.kind} base without a text tower: zero-shot needs a text "
                             "encoder, a causal LM, or a CLIP/SigLIP-style image-text base")
        was_training = self.training
        self.eval()
        out = [self(**self.collate(list(texts[i:i + batch_size]), False)).float()
               for i in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim)

    def feature_layers(self) -> list[str]:
        """Layers whose pooled output can serve as features, input side first; the last is always
        "final" (what `forward` returns). Transferability ranking scores each as a candidate."""
        return ["final"]

    def layer_features(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: [B, D_layer]} pooled features of every `feature_layers()` entry, from one forward pass."""
        return {"final": self(**batch)}

    def source_classifier(self) -> nn.Module | None:
        """The pre-training classifier (e.g. the ImageNet head) when the base has one."""
        return None

    def freeze_batchnorm(self) -> None:
        """Put every BatchNorm in eval mode (used when the base's BN statistics are not trained)."""
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
