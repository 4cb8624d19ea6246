"""Data: image folders and text tables as one `Dataset` with named splits."""
from .dataset import Dataset, Split, load_dataset, load_eval_dataset
from .images import load_image, loader_for

__all__ = ["Dataset", "Split", "load_dataset", "load_eval_dataset", "load_image", "loader_for"]
