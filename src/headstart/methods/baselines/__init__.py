"""`source-only` and `target-oracle`: the two ends every adaptation result is measured between."""
from ..adaptation import AdaptConfig
from ..registry import register_method
from .method import SourceOnly, TargetOracle

register_method("source-only", config_cls=AdaptConfig, method_cls=SourceOnly)
register_method("target-oracle", config_cls=AdaptConfig, method_cls=TargetOracle)
__all__ = ["SourceOnly", "TargetOracle"]
