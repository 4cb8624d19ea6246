"""The pieces of multi-task training (`multitask.fit_multitask`): the temperature-sampled batch plan, the
shared body with a head per task, and the step loss / validation that route each batch to its task's head.

    plan = TaskMixture(sizes=[900, 100], batch_size=16, epochs=3, seed=0, temperature=2.0)
    plan.batches(0)[0]       # [903, 917, ...]: global indices, every one from the same task
    plan.task_of(903)        # 1: the examples of task 1 are numbered 900..999

Imported only by `fit_multitask` (it imports torch at module level).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import Split


def task_probabilities(sizes: Sequence[int], temperature: float) -> list[float]:
    """p_i ∝ n_i^(1/T): T=1 samples tasks in proportion to their size, larger T flattens towards uniform
    (T=inf: uniform), so a small task is not drowned by a large one (Arivazhagan et al. 2019, mT5).

    >>> task_probabilities([900, 100], 2.0)
    [0.75, 0.25]
    """
    if not temperature > 0:
        from ..core.errors import ConfigError

        raise ConfigError(f"temperature must be > 0 (1: proportional to task size, inf: uniform), got {temperature}")
    weights = [float(n) ** (1.0 / temperature) if n > 0 else 0.0 for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


@dataclass
class TaskMixture:
    """Every step draws a task by temperature sampling over task sizes, then a batch of that task.

    Examples are numbered globally: task i's example j is `offsets[i] + j`, so a batch stays a plain list of
    indices (the engine's `shard` splits it across processes as any other). An epoch has as many steps as
    one pass over all tasks' examples would (ceil(sum n_i / batch_size)). Within an epoch each task cycles
    through its own seeded permutations, so a sampled-often small task repeats its examples rather than
    running dry. A pure function of (sizes, seed, epoch): a resumed run sees the same batches.
    """

    sizes: Sequence[int]
    batch_size: int
    epochs: int
    seed: int = 0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.probabilities = task_probabilities(self.sizes, self.temperature)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(sum(self.sizes) / self.batch_size))

    def task_of(self, index: int) -> int:
        """The task a global example index belongs to."""
        return max(i for i, start in enumerate(self.offsets) if index >= start)

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        tasks = rng.choices(range(len(self.sizes)), weights=self.probabilities, k=self.steps_per_epoch)
        streams = [self._stream(t, epoch) for t in range(len(self.sizes))]
        return [[self.offsets[t] + next(streams[t]) for _ in range(min(self.batch_size, self.sizes[t]))]
                for t in tasks]

    def _stream(self, task: int, epoch: int):
        """Task `task`'s example indices, permutation after seeded permutation (each pass a fresh order)."""
        n, cycle = self.sizes[task], 0
        while True:
            seed = ((self.seed * 100_003 + epoch) * 1_009 + task) * 10_007 + cycle
            yield from torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            cycle += 1


class MultiTaskModel(nn.Module):
    """One shared body (a PEFT-wrapped or partly unfrozen backbone) and a linear head per task.

    It answers to what methods ask of a `SpecialistModel` (`backbone`, `base`, `head`, `collate`), so the lora
    and finetune methods' `param_groups` and `set_mode` work on it unchanged: `head` is the ModuleDict of every
    task's head, so the head group of the optimizer holds them all.
    """

    def __init__(self, backbone: nn.Module, num_classes: dict[str, int]):
        super().__init__()
        self.backbone = backbone
        dim = self.base.feature_dim
        self.head = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in num_classes.items()})

    def forward(self, task: str, **batch: torch.Tensor) -> torch.Tensor:  # [B, classes of `task`]
        return self.head[task](self.backbone(**batch))

    def collate(self, items, train: bool = False) -> dict[str, torch.Tensor]:
        return self.base.collate(items, train)

    @property
    def base(self):
        """The headstart Backbone under any PEFT wrapper."""
        backbone = self.backbone
        return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


class TaskView(nn.Module):
    """One task's classifier over the shared model (what `evaluate_split` and the LP-FT probe take)."""

    def __init__(self, model: MultiTaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(self.task, **batch)

    def collate(self, items, train: bool = False) -> dict[str, torch.Tensor]:
        return self.model.collate(items, train)

    @property
    def base(self):
        return self.model.base

    @property
    def head(self) -> nn.Linear:
        return self.model.head[self.task]


def mixture_step(model: MultiTaskModel, plan: TaskMixture, names: list[str], trains: list[Split], load: Callable,
                 label_smoothing: float = 0.0):
    """The step loss: cross-entropy of a batch through its own task's head (every index of a batch is one task's)."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def step(idx: list[int], progress: float):
        task = plan.task_of(idx[0])
        local = [i - plan.offsets[task] for i in idx]  # [B] indices into this task's training split
        split, device = trains[task], next(model.parameters()).device
        batch = model.collate([load(split.items[i]) for i in local], True)
        labels = torch.tensor([split.labels[i] for i in local], device=device)
        logits = model(names[task], **{k: v.to(device) for k, v in batch.items()})
        return loss_fn(logits.float(), labels), {}, len(idx)

    return step


def mean_validation(model: MultiTaskModel, vals: dict[str, Split], load: Callable, batch_size: int,
                    label_smoothing: float = 0.0) -> Callable[[], dict[str, float]] | None:
    """The validation `BestEpoch` selects on: the mean of the tasks' val accuracy and loss (each task counts the
    same whatever its size), plus each task's accuracy for the history. Only tasks with a validation split count
    (`selection_splits` gives none to a small task without one: a tiny holdout is too noisy to select on and costs
    scarce data); None when no task has one, so the last epoch is kept."""
    from ..methods.training import evaluate_split

    if not vals:
        return None

    def evaluate() -> dict[str, float]:
        rows = {name: evaluate_split(TaskView(model, name), split, load, batch_size, label_smoothing)
                for name, split in vals.items()}
        out = {key: sum(r[key] for r in rows.values()) / len(rows) for key in ("val_accuracy", "val_loss")}
        out.update({f"val_accuracy_{name}": r["val_accuracy"] for name, r in rows.items()})
        return out

    return evaluate
