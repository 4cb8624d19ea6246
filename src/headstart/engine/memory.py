"""How much memory a run may use, how much it uses, and whether a plan fits -- decided before training.

`--memory-budget 6GB` (API: `memory_budget="6GB"`) caps what a run plans for; unset, the budget is a
safe share of what this machine (or its cgroup / address-space limit) has free when the run starts.
A method turns its measured per-example cost into a plan (micro-batch, accumulation, checkpointing)
with `plan_micro_batch`; a run that cannot fit even at one example per step fails up front with
the numbers (`MemoryBudgetError`) instead of being killed by the OOM killer half-way.

>>> budget = resolve_budget("6GB")
>>> plan = plan_micro_batch(budget, fixed=2 * GB, per_example={"off": 900 * MB, "on": 120 * MB}, batch_size=8)
>>> plan.micro_batch, plan.accumulation, plan.checkpointing
(8, 1, 'on')
"""
from __future__ import annotations

import os
import re
import resource
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError, HeadstartError

MB = 1 << 20
GB = 1 << 30
DEFAULT_SHARE = 0.8
"""Share of the memory free at the start that a run plans for when no budget is given: the rest is
left to the OS, the page cache and whatever else the user runs."""

_UNITS = {"": GB, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MB, "mb": MB, "mib": MB,
          "g": GB, "gb": GB, "gib": GB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


class MemoryBudgetError(HeadstartError):
    """The run cannot fit in its memory budget, whatever the micro-batch: said before any training."""


def parse_size(value: str | int | float) -> int:
    """Bytes of `6GB`, `6g`, `512MB`, `1.5GiB` or a bare number of GB (`6`); powers of 1024 throughout."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory budget {value!r}: write a size such as 6GB, 512MB or 1.5GiB")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size < 64 * MB:
        raise ConfigError(f"memory budget {value!r} is below 64 MB: no model fits in that")
    return size


def rss_bytes() -> int:
    """Resident memory of this process now (Linux: /proc/self/statm; elsewhere the peak so far)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * 1024 if os.uname().sysname == "Linux" else peak  # kB on Linux, bytes on macOS


def training_state_bytes(model) -> int:
    """Bytes training adds for the parameters that require a gradient: the gradient and AdamW's two moments."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def available_bytes() -> int:
    """What this process could still take: the least of the machine's MemAvailable, the cgroup's
    memory.max minus its usage, and the address-space limit (RLIMIT_AS) minus what is mapped."""
    limits = []
    meminfo = _read("/proc/meminfo")
    match = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    if match:
        limits.append(int(match.group(1)) * 1024)
    cgroup = _cgroup_files()
    if cgroup is not None:
        high, used = (_read(f).strip() for f in cgroup)
        if high.isdigit() and used.isdigit() and int(high) < 1 << 60:
            limits.append(int(high) - int(used))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            mapped = 0
        limits.append(soft - mapped)
    return max(0, min(limits)) if limits else 8 * GB


@dataclass(frozen=True)
class Budget:
    """The bytes a run may hold at its peak (resident memory of the whole process)."""

    bytes: int
    source: str
    """Where the figure comes from: `--memory-budget` or `80% of free memory`."""

    def __str__(self) -> str:
        return f"{human(self.bytes)} ({self.source})"


def resolve_budget(value: str | int | float | None = None) -> Budget:
    """The run's budget: `value` when given, else DEFAULT_SHARE of what is free now plus what this
    process already holds (the model it loaded counts against the budget, not on top of it)."""
    if value not in (None, "", "auto"):
        return Budget(parse_size(value), "--memory-budget")
    free = available_bytes() + rss_bytes()
    return Budget(int(DEFAULT_SHARE * free), f"{DEFAULT_SHARE:.0%} of the memory free at the start")


@dataclass(frozen=True)
class MemoryPlan:
    """What a trainer does to fit: examples per forward, forwards per optimizer step, checkpointing."""

    micro_batch: int
    accumulation: int
    checkpointing: str
    estimate: int
    """Predicted peak resident bytes of the run."""
    budget: Budget
    eval_batch: int = 0
    """Examples per inference forward (validation) within the budget; 0: the method's default."""

    def describe(self) -> str:
        return (f"memory plan: {self.micro_batch} per forward x {self.accumulation} accumulated, activation "
                f"checkpointing {self.checkpointing}; estimated peak {human(self.estimate)} of {self.budget}")


def plan_micro_batch(budget: Budget, *, fixed: int, per_example: dict[str, int], batch_size: int,
                     sizes: list[int] | None = None, what: str = "training") -> MemoryPlan:
    """The largest micro-batch that fits `budget`, trying the checkpointing modes of `per_example` in the
    order given. `sizes`: the micro-batches allowed (default: the divisors of `batch_size`, so every
    forward holds the same number of examples; a user's own choice is checked alone).

    `fixed`: bytes held whatever the batch (weights, optimizer state, runtime); `per_example`: the
    measured bytes one example adds at its peak, per checkpointing mode (e.g. {"on": ..., "off": ...}).
    Raises MemoryBudgetError, with the numbers, when the smallest micro-batch does not fit either.
    """
    sizes = sorted(sizes or [d for d in range(1, batch_size + 1) if batch_size % d == 0], reverse=True)
    for mode, cost in per_example.items():
        for micro in sizes:
            estimate = fixed + micro * cost
            if estimate <= budget.bytes:
                return MemoryPlan(micro, -(-batch_size // micro), mode, estimate, budget)
    smallest = sizes[-1] * min(per_example.values())
    raise MemoryBudgetError(
        f"{what} does not fit in {budget}: the model, optimizer and runtime take {human(fixed)} and "
        f"{sizes[-1]} example(s) per step add {human(smallest)} at least ({human(fixed + smallest)} in all). "
        "Give a larger --memory-budget, a smaller max_length, or a smaller base.")


def saved_activation_bytes(model, forward: Callable[[], Any], train: bool = True) -> int:
    """Bytes autograd saves for the backward during `forward()` (each storage once, parameters not counted):
    what one example (or batch) holds until its backward. `train`: measure in train mode (dropout masks are
    saved too); False keeps the model's own modes (frozen BatchNorms). Buffers (BatchNorm statistics) are
    put back: measuring must not train them."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    was_training, buffers = model.training, {k: v.clone() for k, v in model.named_buffers()}
    if train:
        model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        del out
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return sum(seen.values())


def human(size: int | float) -> str:
    return f"{size / GB:.2f} GB" if abs(size) >= GB else f"{size / MB:.0f} MB"


class PeakSampler:
    """Samples this process's resident memory every `interval` seconds in a thread: the peak of a phase
    (`with PeakSampler() as s: ...; s.peak`), which the kernel's lifetime high-water mark cannot give."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakSampler":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def _cgroup_files() -> tuple[Path, Path] | None:
    """(limit, usage) files of this process's memory cgroup: v2 memory.max / memory.current, or v1's
    memory.limit_in_bytes / memory.usage_in_bytes (a v1 limit reads as a huge number when unset)."""
    for line in _read("/proc/self/cgroup").splitlines():
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:
            folder, names = Path("/sys/fs/cgroup") / path.lstrip("/"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            folder, names = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), ("memory.limit_in_bytes",
                                                                               "memory.usage_in_bytes")
        else:
            continue
        if (folder / names[0]).exists():
            return folder / names[0], folder / names[1]
    return None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
