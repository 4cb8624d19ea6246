from __future__ import annotations

from ..base import SpecialistModel
from ..training import TrainedMethod
from .config import ScratchConfig


class Scratch(TrainedMethod):
    """The same architecture trained from random weights: what you would get without transfer."""

    needs_pretrained = False

    def prepare(self, backbone, num_classes: int, cfg: ScratchConfig) -> SpecialistModel:
        for p in backbone.parameters():
            p.requires_grad_(True)
        return SpecialistModel(backbone, num_classes)
