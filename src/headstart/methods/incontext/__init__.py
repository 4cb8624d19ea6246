"""`incontext`: a causal LM with K labelled examples per class in the prompt; labels scored by log-likelihood."""
from ..registry import register_method
from .config import InContextConfig
from .method import InContext

register_method("incontext", config_cls=InContextConfig, method_cls=InContext)
__all__ = ["InContext", "InContextConfig"]
