"""`setfit`: contrastive tuning of the base on pairs of the few examples, then a linear head (SetFit's recipe)."""
from ..registry import register_method
from .config import SetFitConfig
from .method import SetFit

register_method("setfit", config_cls=SetFitConfig, method_cls=SetFit)
__all__ = ["SetFit", "SetFitConfig"]
