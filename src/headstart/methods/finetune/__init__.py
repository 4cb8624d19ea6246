"""`finetune`: unfreeze the top N blocks (or all) with layer-wise LR decay and optional gradual unfreezing."""
from ..registry import register_method
from .config import FinetuneConfig
from .method import Finetune

register_method("finetune", config_cls=FinetuneConfig, method_cls=Finetune)
__all__ = ["Finetune", "FinetuneConfig"]
