"""Methods: each a small package with a config dataclass and an implementation, registered by name."""
from .registry import get_method_spec, list_methods, make_method, register_method

__all__ = ["get_method_spec", "list_methods", "make_method", "register_method"]
