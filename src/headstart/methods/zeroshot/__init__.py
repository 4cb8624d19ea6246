"""`zeroshot`: no labelled examples -- label names or descriptions against the input."""
from ..registry import register_method
from .config import ZeroShotConfig
from .method import ZeroShot

register_method("zeroshot", config_cls=ZeroShotConfig, method_cls=ZeroShot)
__all__ = ["ZeroShot", "ZeroShotConfig"]
