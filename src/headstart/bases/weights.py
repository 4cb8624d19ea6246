"""Identify weights by sha256 and write converted weights (safetensors only: nothing here unpickles)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.storage import sha256_file


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of every state-dict tensor, in key order.

    Identifies weights that exist only in memory (the tiny random bases); deterministic for a
    deterministic init, and independent of memory layout (channels_last is made contiguous).
    """
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view as bytes: numpy has no bfloat16, so go through a uint8 view of the storage
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file via a temporary name, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def weights_sha256(folder: Path) -> str:
    """sha256 of a model folder's weights: the file itself, or of its shards' hashes."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return sha256_file(folder / single)
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        return "unknown"
    return hashlib.sha256("".join(sha256_file(p) for p in shards).encode()).hexdigest()


class quiet_weight_loading:
    """Silence transformers' per-tensor "Loading weights" bar: a base that loads in 0.1 s needs none.

    (The ~20 s GGUF dequantisation keeps its bar: it is not wrapped in this.)
    """

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was_enabled:
            hf_logging.enable_progress_bar()
        return False
