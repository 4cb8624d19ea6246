"""`dpo` methods: `lora` and `qlora` (the same, on a 4-bit NF4 base), usually continuing an SFT bundle."""
from ..registry import register_method
from .config import DPOConfig
from .method import DPO, QloraDPO

register_method("lora", task="dpo", config_cls=DPOConfig, method_cls=DPO)
register_method("qlora", task="dpo", config_cls=DPOConfig, method_cls=QloraDPO)
__all__ = ["DPO", "QloraDPO", "DPOConfig"]
