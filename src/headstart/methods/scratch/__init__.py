"""`scratch`: the base's architecture from random initialisation — the baseline that shows what transfer buys."""
from ..registry import register_method
from .config import ScratchConfig
from .method import Scratch

register_method("scratch", config_cls=ScratchConfig, method_cls=Scratch)
__all__ = ["Scratch", "ScratchConfig"]
