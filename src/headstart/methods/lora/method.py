from __future__ import annotations

from pathlib import Path

import torch

from ...engine.checkpoint import copy_state_into
from ..base import ADAPTER_DIR, SpecialistModel
from ..training import TrainedMethod
from .config import LoraMethodConfig


class Lora(TrainedMethod):
    """PEFT LoRA adapters + a new head; the base stays frozen and is never stored in the bundle."""

    config: LoraMethodConfig

    def peft_config(self, backbone):
        from peft import LoraConfig  # imported when used: peft costs seconds to import

        cfg = self.config
        targets = cfg.target_modules.split(",") if cfg.target_modules else backbone.lora_target_modules()
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", base_model_name_or_path=backbone.info.name)

    def prepare(self, backbone, num_classes: int, cfg: LoraMethodConfig) -> SpecialistModel:
        from peft import get_peft_model

        backbone.name_or_path = backbone.info.name  # PEFT records this as the adapter's base model
        peft_backbone = get_peft_model(backbone, self.peft_config(backbone))
        _match_memory_format(peft_backbone)
        return SpecialistModel(peft_backbone, num_classes)

    def param_groups(self, model: SpecialistModel, cfg: LoraMethodConfig) -> list[dict]:
        adapters = [p for p in model.backbone.parameters() if p.requires_grad]
        return [{"params": adapters, "lr": cfg.lr, "weight_decay": 0.0, "name": "lora"},
                {"params": list(model.head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay,
                 "name": "head"}]

    def set_mode(self, model: SpecialistModel, epoch: int) -> None:
        model.train()
        # The base's BN statistics are not stored (only adapters are): keep using the pretrained ones.
        model.base.freeze_batchnorm()

    def trained_state(self, model: SpecialistModel) -> dict[str, torch.Tensor]:
        # The adapter goes into PEFT's own folder; the safetensors beside the manifest hold the head.
        return {k: v.detach() for k, v in model.head.state_dict(prefix="head.").items()}

    def save_artifacts(self, model: SpecialistModel, folder: Path, base_name: str) -> None:
        model.backbone.peft_config["default"].base_model_name_or_path = base_name
        # save_embedding_layers=False: LoRA here never trains embeddings, and "auto" would look the
        # base up on the hub (a network call, offline a warning) to guess whether the vocabulary grew.
        model.backbone.save_pretrained(str(folder / ADAPTER_DIR), save_embedding_layers=False)

    def restore(self, backbone, num_classes: int, state: dict[str, torch.Tensor], folder: Path) -> SpecialistModel:
        from peft import PeftModel

        backbone.name_or_path = backbone.info.name
        peft_backbone = PeftModel.from_pretrained(backbone, str(folder / ADAPTER_DIR))
        _match_memory_format(peft_backbone)
        model = SpecialistModel(peft_backbone, num_classes)
        copy_state_into(model, state)
        return model


def _match_memory_format(peft_backbone) -> None:
    # PEFT creates the adapter convs in the default (NCHW) layout; mixed layouts inside an image
    # base make every adapted layer convert its input back and forth. Image bases run channels_last.
    if peft_backbone.get_base_model().kind == "image":
        peft_backbone.to(memory_format=torch.channels_last)
