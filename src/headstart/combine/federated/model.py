"""One party's specialist (a client's, or the server's copy of the global one) and what crosses the wire.

Only the trained tensors travel: the LoRA adapter and the head (`lora`), or the head and the unfrozen
blocks (`finetune`; `unfreeze=0` = head only). They go as a list of float32 NumPy arrays in the sorted
order of their names, so both ends agree on the layout without sending names; the base never leaves.

Imported only by the functions that federate (torch and PEFT load here).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ...core.errors import ConfigError
from ...engine.checkpoint import trainable_state
from ...engine.trainer import Hook, RunState
from ...methods.base import SpecialistModel, loader_for
from ...methods.training import TrainedMethod, evaluate_split


@dataclass
class Party:
    """A base + method + head over `classes`, built once per process and reused every round."""

    base_name: str
    method_name: str
    classes: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        from ...bases import load_base
        from ...methods.registry import make_method

        self.backbone = load_base(self.base_name)
        method = make_method(self.method_name, "classify", **self.options)
        if not isinstance(method, TrainedMethod):
            raise ConfigError(f"method {self.method_name!r} does not train through the engine; federated learning "
                              "needs lora, or finetune (unfreeze=0 trains the head alone)")
        self.method = method.resolved(self.backbone.kind)
        torch.manual_seed(self.seed)  # every party builds the same initial adapter and head
        self.model: SpecialistModel = self.method.prepare(self.backbone, len(self.classes), self.method.config)
        self.keys = sorted(trainable_state(self.model))

    @property
    def kind(self) -> str:
        return self.backbone.kind

    def get_arrays(self) -> list[np.ndarray]:
        """Copies (a CPU tensor's `.numpy()` shares its memory: training would change them afterwards)."""
        state = trainable_state(self.model)
        return [state[k].detach().float().cpu().numpy().copy() for k in self.keys]

    def set_arrays(self, arrays: list[np.ndarray]) -> None:
        if len(arrays) != len(self.keys):
            raise ConfigError(f"the server sent {len(arrays)} tensors where this client trains {len(self.keys)}: "
                              "server and clients must use the same base, method and options")
        state = trainable_state(self.model)
        with torch.no_grad():
            for key, array in zip(self.keys, arrays):
                target = state[key]
                if tuple(target.shape) != tuple(array.shape):
                    raise ConfigError(f"tensor {key}: the server sent shape {tuple(array.shape)}, "
                                      f"this client has {tuple(target.shape)} (different base or options?)")
                target.copy_(torch.from_numpy(np.asarray(array)).to(target.dtype))

    def train(self, split, *, epochs: int, proximal_mu: float, seed: int, log: Callable[[str], None],
              lr_factor: float = 1.0, lr_schedule: Callable[[int, int], float] | None = None) -> float:
        """Local epochs on `split` through the engine (FedProx's pull as a hook); returns the mean train loss.

        The learning rate is constant within a round (`lr_factor` x the method's rates): a round is a few
        steps on a small shard, too short for a warm-up and decay of its own; the decay runs across rounds.
        `lr_schedule` replaces it (a client training alone uses the usual warm-up + cosine).
        """
        from ...engine.batches import EpochShuffle
        from ...engine.trainer import TrainSettings, train
        from ...methods.training import cross_entropy_step

        cfg = self.method.config
        torch.manual_seed(seed)  # LoRA dropout draws from torch's global generator
        hooks = [ProximalTerm(self.model, proximal_mu)] if proximal_mu > 0 else []
        result = train(self.model, plan=EpochShuffle(len(split), cfg.batch_size, epochs, seed),
                       step_loss=cross_entropy_step(self.model, split, loader_for(self.kind), cfg.label_smoothing),
                       param_groups=self.method.param_groups(self.model, cfg),
                       settings=TrainSettings(lr_schedule=lr_schedule or (lambda step, total: lr_factor), grad_clip=1.0,
                                              loss_key="train_loss"),
                       hooks=hooks, set_mode=lambda epoch: self.method.set_mode(self.model, epoch), progress=False,
                       log=log)
        losses = [row["train_loss"] for row in result.history if "train_loss" in row]
        return float(losses[-1]) if losses else float("nan")

    def accuracy(self, split, batch_size: int = 64) -> float:
        return evaluate_split(self.model, split, loader_for(self.kind), batch_size)["val_accuracy"] if len(split) else 0.0


class ProximalTerm(Hook):
    """FedProx (Li et al. 2020): (mu / 2) * ||w - w_global||^2 over the trained tensors, added to every
    step's loss, so a client with skewed data cannot drift far from the round's global model."""

    name = "fedprox"

    def __init__(self, model: torch.nn.Module, mu: float):
        self.mu = float(mu)
        # The anchor is the global model this round started from (set_arrays ran before training).
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def extra_loss(self, run: RunState, batch) -> torch.Tensor | None:
        terms = [((p - self.anchor[n].to(p.device)) ** 2).sum()
                 for n, p in run.model.named_parameters() if p.requires_grad and n in self.anchor]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else None


def round_lr_factor(server_round: int, rounds: int) -> float:
    """Cosine decay of the clients' learning rate over the rounds (round 1: the full rate)."""
    import math

    return 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / max(1, rounds)))


def payload_bytes(arrays: list[np.ndarray]) -> int:
    """What one model update weighs on the wire (the tensors' bytes; gRPC framing not counted)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))


def classes_to_config(classes: list[str]) -> str:
    """Flower configs carry scalars only: the label set travels as one JSON string."""
    return json.dumps(list(classes))


def remap_labels(split, own_classes: list[str], global_classes: list[str]):
    """A client's split relabelled into the global label order (its table may hold only some classes)."""
    from ...data import Split

    index = {name: i for i, name in enumerate(global_classes)}
    unknown = sorted(set(own_classes) - set(index))
    if unknown:
        raise ConfigError(f"this client's data has labels the federation does not know: {', '.join(unknown[:5])}")
    return Split(list(split.items), [index[own_classes[y]] for y in split.labels])
