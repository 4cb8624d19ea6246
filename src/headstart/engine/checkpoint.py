"""Training checkpoints (each epoch end, or every N steps) as safetensors + JSON (no pickle), written atomically.

Layout of a checkpoint folder:
    weights.safetensors    the trainable part of the model (same names as model.state_dict())
    optimizer.safetensors  every tensor of optimizer.state_dict()["state"], keyed "<param index>.<key>"
    state.json             epoch, best score, history, scheduler state, optimizer param_groups, fingerprint
    rng.safetensors        torch's CPU RNG state, so augmentation and dropout continue the same stream
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import TrainingError
from ..core.storage import atomic_dir, discard_dir, recover_interrupted_swap


def save_checkpoint(folder: Path, *, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write a checkpoint atomically (a kill -9 at any point leaves the old or the new one whole);
    `extra` adds more safetensors files (e.g. the best weights so far)."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    full_state = {**state, "scheduler": sched, "param_groups": opt["param_groups"], "optimizer_scalars": scalars}
    with atomic_dir(folder) as tmp:
        save_file(_own_copies(weights), tmp / "weights.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        for name, tensors_ in (extra or {}).items():
            save_file(_own_copies(tensors_), tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(full_state, default=float))


def _own_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights (an LM's embeddings and head) share storage, which safetensors refuses.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def find_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint at `folder` (restoring the previous one if a swap was interrupted), or None."""
    folder = Path(folder)
    recover_interrupted_swap(folder)
    if (folder / "state.json").exists() and (folder / "weights.safetensors").exists():
        return folder
    return None


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and RNG; return the saved state dict."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    copy_state_into(model, load_file(folder / "weights.safetensors"), what=f"checkpoint {folder}")
    tensors = load_file(folder / "optimizer.safetensors")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    torch.set_rng_state(load_file(folder / "rng.safetensors")["torch"])
    return state


class Checkpointer:
    """Where one run keeps its checkpoints, and whether it resumes from them: the resume rules live here once.

    `restore` refuses a checkpoint written by another run (its `fingerprint` differs: data, base or
    config changed); `save` writes atomically on the main process only (the caller decides).
    """

    def __init__(self, folder: Path | None, *, fingerprint: dict | None = None, resume: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.fingerprint = fingerprint
        self.resume = resume

    def found(self) -> Path | None:
        """The checkpoint to resume from, if resuming and one exists."""
        if not self.resume or self.folder is None:
            return None
        return find_checkpoint(self.folder)

    def restore(self, folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any) -> dict[str, Any]:
        state = json.loads((Path(folder) / "state.json").read_text())
        if self.fingerprint is not None and state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"{folder} belongs to a different run (data, base or config changed); "
                                "delete it or drop --resume")
        return load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler)

    def save(self, *, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any,
             state: dict[str, Any], extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        if self.folder is not None:
            save_checkpoint(self.folder, weights=weights, optimizer=optimizer, scheduler=scheduler,
                            state={**state, "fingerprint": self.fingerprint}, extra=extra)

    def read_extra(self, folder: Path, name: str) -> dict[str, torch.Tensor] | None:
        path = Path(folder) / f"{name}.safetensors"
        return load_file(path) if path.exists() else None

    def discard(self) -> None:
        """The run finished: its checkpoints are spent."""
        if self.folder is not None:
            discard_dir(self.folder)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, plus all buffers (BN statistics) of the modules that own them.

    Buffers are included whatever the module's current mode: a BN layer trained in train mode
    and saved in eval mode still carries statistics that differ from the base's.
    """
    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if any(p.requires_grad for _, p in own):
            prefix = mname + "." if mname else ""
            for n, p in own:
                if p.requires_grad:
                    out[prefix + n] = p
            for n, b in module.named_buffers(recurse=False):
                if n not in module._non_persistent_buffers_set:  # e.g. CLIP's position_ids: not state
                    out[prefix + n] = b
    return out


def copy_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str = "stored weights") -> None:
    """Copy a partial state dict (what was trained) into `model` in place; every name must exist."""
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise TrainingError(f"{what} do not fit this model, e.g. {unknown[0]}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def run_checkpoint_dir(out: str | Path | None, fingerprint: dict) -> Path:
    """Where a fit keeps its resume checkpoints: beside `out`, else in the cache under the run's fingerprint."""
    import hashlib

    if out is not None:
        out = Path(out).resolve()
        return out.with_name(f".{out.name}.checkpoint")
    from ..core.storage import cache_dir

    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir("checkpoints") / key


def drop_checkpoints(ckpt: Path) -> None:
    """A finished run's resume checkpoints are spent: remove them (and a half-swapped older copy)."""
    import shutil

    for folder in (ckpt, Path(str(ckpt) + ".old")):
        shutil.rmtree(folder, ignore_errors=True)
