"""`auto`: pick the method from the number of examples per class and the base kind, and say why."""
from ..registry import register_method
from .config import AutoConfig
from .method import Auto, choose_method

register_method("auto", config_cls=AutoConfig, method_cls=Auto)
__all__ = ["Auto", "AutoConfig", "choose_method"]
