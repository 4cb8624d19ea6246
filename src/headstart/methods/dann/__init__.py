"""`dann`: domain-adversarial training with a gradient-reversal layer (Ganin et al. 2016)."""
from ..registry import register_method
from .config import DannConfig
from .method import Dann
from .modules import DannHead, DomainDiscriminator, GradientReversal, grl_coefficient

register_method("dann", config_cls=DannConfig, method_cls=Dann)
__all__ = ["Dann", "DannConfig", "DannHead", "DomainDiscriminator", "GradientReversal", "grl_coefficient"]
