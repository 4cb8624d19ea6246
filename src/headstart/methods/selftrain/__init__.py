"""`selftrain`: confident pseudo-labels on the target, class-balanced, iterated."""
from ..registry import register_method
from .config import SelftrainConfig
from .method import Selftrain, select_pseudo_labels

register_method("selftrain", config_cls=SelftrainConfig, method_cls=Selftrain)
__all__ = ["Selftrain", "SelftrainConfig", "select_pseudo_labels"]
