"""`sft` methods: `lora` (LoRA on the float32 causal LM) and `qlora` (LoRA on its 4-bit NF4 quantisation)."""
from ..registry import register_method
from .config import SFTConfig
from .method import SFT, LMStart, QloraSFT, TuningData

register_method("lora", task="sft", config_cls=SFTConfig, method_cls=SFT)
register_method("qlora", task="sft", config_cls=SFTConfig, method_cls=QloraSFT)
__all__ = ["SFT", "QloraSFT", "SFTConfig", "LMStart", "TuningData"]
