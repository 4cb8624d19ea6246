"""The task registry: name -> a `Task` that owns its data, default base and method, evaluation and artifact."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError

OPTIONAL_INPUTS = ("shots", "target", "image_size", "eval")
"""`fit` arguments that only some tasks read: a task lists the ones it reads in `Task.inputs`."""


@dataclass
class FitSettings:
    """The run-level arguments of one `fit` call that tasks read (the method gets the rest in its FitContext)."""

    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = print
    shots: int | None = None
    target: Any = None
    eval: Any = None
    image_size: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    skip_placeholders: bool = True


@dataclass
class Start:
    """What training starts from: the loaded base (or a parent bundle's model) and its facts."""

    backbone: Any
    """What the method's `fit` receives: a classify `Backbone`, or an `LMStart` for sft/dpo."""
    base: dict[str, Any]
    """The base's manifest entry (name, sha256, kind, params, ...)."""
    parent: dict[str, Any] | None = None
    """The bundle training continues (`fit(..., init=BUNDLE)`), as the manifest records it."""
    target: Any = None
    """Target-domain examples for the adaptation methods (classify only)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Facts about how the base was chosen, for the manifest (e.g. the `base="auto"` ranking)."""


class Task:
    """What a task owns. `fit` calls these in order: method_name, load_data, start, fingerprint,
    (the method trains), artifact, evaluate, save, report."""

    name: str = ""
    summary: str = ""
    default_method: str = ""
    inputs: frozenset[str] = frozenset()
    """The optional `fit` arguments (of OPTIONAL_INPUTS) this task reads; passing another is an error."""

    def check_inputs(self, settings: FitSettings) -> None:
        for name in OPTIONAL_INPUTS:
            if getattr(settings, name) is not None and name not in self.inputs:
                raise ConfigError(f"{name}= does not apply to task {self.name!r}"
                                  + (f" (it reads {', '.join(sorted(self.inputs))})" if self.inputs else ""))

    def method_name(self, method: str | None, init: Path | None) -> str:
        """The method to run: the one asked for, else the task's default."""
        return method or self.default_method

    def load_data(self, data: Any, method: Any, settings: FitSettings) -> Any:
        raise NotImplementedError

    def start(self, base: Any, init: Path | None, data: Any, method: Any, settings: FitSettings) -> Start:
        raise NotImplementedError

    def fingerprint(self, data: Any, start: Start, settings: FitSettings) -> dict[str, Any]:
        """What identifies the training data in a resume fingerprint (fit adds base, method, options, seed)."""
        raise NotImplementedError

    def artifact(self, result: Any, data: Any, start: Start, method: Any, settings: FitSettings) -> Any:
        """The specialist (its manifest without metrics) from what the method trained."""
        raise NotImplementedError

    def evaluate(self, specialist: Any, data: Any, result: Any, settings: FitSettings) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, specialist: Any, data: Any, out: Path, settings: FitSettings) -> Path:
        return specialist.save(out)

    def report(self, specialist: Any, data: Any) -> str:
        """What `fit` logs at the end."""
        raise NotImplementedError


_TASKS: dict[str, Task] = {}


def register_task(name: str, task: Task) -> None:
    """Register `task` under `name` (its methods register with `register_method(..., task=name)`)."""
    if name in _TASKS:
        raise ValueError(f"task {name!r} is already registered")
    task.name = name
    _TASKS[name] = task


def list_tasks() -> list[Task]:
    _ensure_builtins()
    return list(_TASKS.values())


def get_task(name: str) -> Task:
    _ensure_builtins()
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(_TASKS)}")
    return _TASKS[name]


def _ensure_builtins() -> None:
    from . import classify, dpo, sft  # noqa: F401  (each registers itself)
