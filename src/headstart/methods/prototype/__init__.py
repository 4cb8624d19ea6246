"""`prototype`: nearest class mean of frozen, centred, L2-normalised features (cosine)."""
from ..registry import register_method
from .config import PrototypeConfig
from .method import Prototype

register_method("prototype", config_cls=PrototypeConfig, method_cls=Prototype)
__all__ = ["Prototype", "PrototypeConfig"]
