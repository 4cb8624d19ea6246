"""`probe`: frozen base, cached features, a linear head fitted by L-BFGS."""
from ..registry import register_method
from .config import ProbeConfig
from .method import Probe

register_method("probe", config_cls=ProbeConfig, method_cls=Probe)
__all__ = ["Probe", "ProbeConfig"]
