"""Hashing and caching of weight tensors (always safetensors: nothing here unpickles)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of every state-dict tensor, in key order.

    Identifies weights that exist only in memory (tiny random bases, hub weights loaded by
    timm); deterministic for a deterministic init.
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
