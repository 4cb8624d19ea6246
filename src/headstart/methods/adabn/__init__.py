"""`adabn`: re-estimate BatchNorm statistics on the target domain (Li et al. 2016); no target training."""
from ..registry import register_method
from .config import AdabnConfig
from .method import Adabn, bn_layers, recompute_bn_statistics

register_method("adabn", config_cls=AdabnConfig, method_cls=Adabn)
__all__ = ["Adabn", "AdabnConfig", "bn_layers", "recompute_bn_statistics"]
