"""`coral`: align the second-order statistics of source and target features (CORAL / Deep CORAL)."""
from ..registry import register_method
from .config import CoralConfig
from .maths import coral_loss, coral_transform
from .method import Coral

register_method("coral", config_cls=CoralConfig, method_cls=Coral)
__all__ = ["Coral", "CoralConfig", "coral_loss", "coral_transform"]
