"""`lora`: Hugging Face PEFT LoRA on the base plus a trained head; the adapter is saved in PEFT's format."""
from ..registry import register_method
from .config import LoraMethodConfig
from .method import Lora

register_method("lora", config_cls=LoraMethodConfig, method_cls=Lora)
__all__ = ["Lora", "LoraMethodConfig"]
