"""The one training loop. Every trainer is a step loss + a batch plan on it.

    result = train(model, plan=EpochShuffle(n, 16, epochs=3), step_loss=ce_step, param_groups=groups,
                   settings=TrainSettings(lr_schedule=warmup_cosine_schedule(0.1)), hooks=[best_epoch],
                   checkpoint=Checkpointer(folder, fingerprint=fp, resume=True))

- `plan` decides every step's example indices up front (engine/batches.py), so a resumed run skips
  exactly the steps it did and every process agrees on each batch.
- `step_loss(batch, progress)` turns this process's share of a batch into (loss, stats, count):
  cross-entropy for classification, CORAL/DANN for two domains, SetFit's pair loss, the answer loss
  of SFT, DPO's preference loss. `count` (examples or tokens) weights the gradient across processes.
- `hooks` add loss terms (penalties, distillation), act after steps and at epoch ends (validation,
  best-epoch selection, early stopping) and keep their own resumable state.
- Under `accelerate launch --num_processes N` each process runs the same loop on its share of every
  batch; gradients are averaged weighted by each share's count, so a step equals the one-process step
  on the whole batch (exactly, for per-example mean losses), and only the main process writes
  checkpoints. Gradients are all-reduced by hand rather than through DDP's forward hook: the step
  losses call sub-modules directly (a head on cached features, a discriminator, PEFT's base model),
  which DDP would not see.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import TrainingError
from .batches import Batch, BatchPlan, batch_size_of, micro_batches, shard
from .checkpoint import Checkpointer, trainable_state
from .schedule import LrSchedule

StepLoss = Callable[[Batch, float], "tuple[torch.Tensor, dict[str, float], int]"]
"""(this process's share of a batch, training progress in [0, 1)) -> (loss, stats for the log, count)."""


@dataclass
class TrainSettings:
    lr_schedule: LrSchedule
    """(step, total) -> factor on every group's learning rate."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    bf16: bool = False
    """bfloat16 autocast for the step loss."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps inside an epoch (0: at epoch ends only)."""
    log_every: int = 0
    """A history row every N steps (0: one row per epoch)."""
    loss_key: str = "loss"
    """Name of the mean loss in epoch rows (`train_loss` for classification)."""
    micro_batch: int = 0
    """Gradient accumulation: run each batch through `step_loss` in parts of this many examples, one
    backward per part, then one optimizer step (0: the whole batch at once). The step's gradient is
    the same as the whole batch's when `loss_weight` weighs each part as the loss averages it."""
    loss_weight: Callable[[Batch], float] | None = None
    """The weight of a part's mean loss in the batch's (default: its number of examples; a token-averaged
    loss passes its number of scored tokens)."""


@dataclass
class RunState:
    """What hooks see: the model being trained and where the run stands."""

    model: nn.Module
    epoch: int = 0
    step: int = 0
    total: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    device: Any = "cpu"
    is_main_process: bool = True
    count: int = 0
    """Examples (or tokens) seen so far by all processes, resumed runs included."""


class Hook:
    """Extension points of the loop; override what you need. `name` keys the hook's checkpointed state."""

    name = "hook"

    def extra_loss(self, run: RunState, batch: Batch) -> torch.Tensor | None:
        """A term added to the step loss (an L2-SP/EWC penalty, a distillation loss)."""
        return None

    def after_step(self, run: RunState) -> None:
        pass

    def end_of_epoch(self, run: RunState, row: dict[str, Any]) -> bool:
        """Called once per epoch before its checkpoint; may add figures to `row`; True stops training."""
        return False

    def finish(self, run: RunState) -> None:
        """After the last step (e.g. restore the best epoch's weights)."""

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON state, tensors) to checkpoint."""
        return {}, {}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> None:
        pass


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    train_s: float
    steps: int
    count: int
    """Examples (or tokens) processed by all processes in this session (not before a resume)."""
    total_count: int = 0
    """The same, counting the steps done before a resume too."""
    num_processes: int = 1
    is_main_process: bool = True
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def per_s(self) -> float:
        return self.count / self.train_s if self.train_s > 0 else 0.0

    def training_facts(self) -> dict[str, Any]:
        """How the model was trained, for the manifest."""
        return {"processes": self.num_processes, "device": self.device, "precision": self.precision}


def is_main_process() -> bool:
    """False on every process but the first of an `accelerate launch` / torchrun run (its RANK is set);
    true for a plain run. Closed-form methods never start the engine, so `fit` asks here too."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def autocast(enabled: bool, device: str | None = None):
    """bfloat16 autocast on `device` (default: the GPU if there is one, else the CPU) when enabled; else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=torch.bfloat16)


def train(model: nn.Module, *, plan: BatchPlan, step_loss: StepLoss, param_groups: list[dict],
          settings: TrainSettings, hooks: Sequence[Hook] = (), set_mode: Callable[[int], None] | None = None,
          checkpoint: Checkpointer | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train every parameter in `param_groups` on `plan` with `step_loss`; returns the history and facts.

    `set_mode(epoch)` puts the model in train mode for an epoch (frozen BatchNorms, gradual unfreezing).
    """
    loop = _Loop(model, param_groups, step_loss, settings, hooks, checkpoint or Checkpointer(None))
    epochs = [plan.batches(e) for e in range(plan.epochs)]
    run = loop.start(epochs, set_mode, log)
    bar = tqdm(total=run.total, initial=run.step, disable=not progress or not run.is_main_process,
               file=sys.stderr, unit="step", dynamic_ncols=True)
    t0, first, counted = time.perf_counter(), run.step, 0
    for epoch, batches in enumerate(epochs):
        start = sum(len(b) for b in epochs[:epoch])
        if run.step >= start + len(batches):
            continue  # done before the resume
        run.epoch = epoch
        if set_mode is not None:
            set_mode(epoch)
        sums, epoch_t0 = {}, time.perf_counter()
        if loop.partial.get("epoch") == epoch:  # resumed inside this epoch: continue its running figures
            sums, epoch_t0 = loop.partial["sums"], epoch_t0 - loop.partial["elapsed"]
        for batch in batches[run.step - start:]:
            loss, stats, count = loop.step(run, batch)
            counted += count
            _accumulate(sums, {"loss": loss, **stats})
            bar.set_postfix(epoch=f"{epoch + 1}/{len(epochs)}", loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if settings.log_every and (run.step % settings.log_every == 0 or run.step == run.total):
                run.history.append({"step": run.step, **_means(sums), "lr": loop.scheduler.get_last_lr()[0]})
                sums = {}
            if settings.checkpoint_every and run.step % settings.checkpoint_every == 0 and run.step < start + len(batches):
                loop.save(run, partial={"epoch": epoch, "sums": sums, "elapsed": time.perf_counter() - epoch_t0})
        row = {"epoch": epoch + 1}
        if not settings.log_every:
            means = _means(sums)
            row.update({settings.loss_key: means.pop("loss", 0.0), **means, "epoch_s": time.perf_counter() - epoch_t0})
            run.history.append(row)
        stop = any([hook.end_of_epoch(run, row) for hook in hooks])  # a list: every hook sees every epoch
        loop.save(run, partial={})
        if stop and epoch + 1 < len(epochs):
            break
    bar.close()
    for hook in hooks:
        hook.finish(run)
    model.eval()
    return TrainResult(history=run.history, train_s=time.perf_counter() - t0, steps=run.step - first, count=counted,
                       total_count=run.count, num_processes=loop.world, is_main_process=run.is_main_process,
                       device=str(run.device), precision="bf16-autocast" if settings.bf16 else "fp32")


class _Loop:
    """The state one `train` call steps: the accelerator, optimizer, schedule, hooks and checkpointer."""

    def __init__(self, model: nn.Module, param_groups: list[dict], step_loss: StepLoss, settings: TrainSettings,
                 hooks: Sequence[Hook], checkpoint: Checkpointer):
        from accelerate import Accelerator  # imported here: prediction never needs it

        self.accelerator = Accelerator()
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.params = [p for g in param_groups for p in g["params"]]
        if not any(p.requires_grad for p in self.params):
            raise TrainingError("nothing to train: no parameter in the optimizer requires a gradient")
        self.model, self.step_loss, self.settings, self.hooks, self.checkpoint = (
            model, step_loss, settings, hooks, checkpoint)
        model.to(self.accelerator.device)
        if self.world > 1:
            _broadcast_from_main(model)
        self.optimizer = torch.optim.AdamW(param_groups)
        self.partial: dict = {}

    def start(self, epochs: list, set_mode, log) -> RunState:
        total = sum(len(b) for b in epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: self.settings.lr_schedule(s, total))
        run = RunState(model=self.model, total=total, device=self.accelerator.device,
                       is_main_process=self.accelerator.is_main_process)
        self.partial = _resume(self.checkpoint, run, epochs, self.optimizer, self.scheduler, self.hooks, set_mode, log)
        return run

    def step(self, run: RunState, batch: Batch) -> tuple[float, dict[str, float], int]:
        """One optimizer step on this process's share of `batch`; returns (loss, stats, count of all processes)."""
        mine = shard(batch, self.rank, self.world) if self.world > 1 else batch
        if batch_size_of(mine):
            loss, stats, count = self._forward_backward(run, mine)
        else:  # a batch smaller than the number of processes: this one only joins the averaging
            loss, stats, count = 0.0, {}, 0
        if self.world > 1:
            _average_gradients(self.params, count)
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.requires_grad], self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            _broadcast_buffers(self.model)
        run.step += 1
        run.count += count * self.world
        for hook in self.hooks:
            hook.after_step(run)
        return loss, stats, count * self.world

    def _forward_backward(self, run: RunState, batch: Batch) -> tuple[float, dict[str, float], int]:
        """Loss and gradient of `batch`, in micro-batches when the settings ask for them (accumulated)."""
        parts = micro_batches(batch, self.settings.micro_batch)
        weigh = self.settings.loss_weight or batch_size_of
        weights = [float(weigh(p)) for p in parts]
        total_weight = sum(weights) or 1.0
        loss_sum, stats_sum, count = 0.0, {}, 0
        for part, weight in zip(parts, weights):
            share = weight / total_weight
            with autocast(self.settings.bf16, self.accelerator.device.type):
                loss, stats, part_count = self.step_loss(part, run.step / max(1, run.total))
                for hook in self.hooks:
                    extra = hook.extra_loss(run, part)
                    if extra is not None:
                        loss = loss + extra
            (loss * share if len(parts) > 1 else loss).backward()
            loss_sum += loss.item() * share
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value * share
            count += part_count
        return loss_sum, stats_sum, count

    def save(self, run: RunState, partial: dict) -> None:
        _save(self.checkpoint, run, self.optimizer, self.scheduler, self.hooks, self.accelerator, partial)


def _resume(checkpoint: Checkpointer, run: RunState, epochs: list, optimizer, scheduler, hooks, set_mode, log) -> dict:
    """Restore weights, optimizer, scheduler, RNG, history and hook states from the last checkpoint, if resuming."""
    found = checkpoint.found()
    if found is None:
        return {}
    import json

    step = json.loads((found / "state.json").read_text()).get("step", 0)
    epoch, start = 0, 0
    while epoch < len(epochs) - 1 and step >= start + len(epochs[epoch]):
        start += len(epochs[epoch])
        epoch += 1
    if set_mode is not None:
        set_mode(epoch)  # the epoch's trainable set first (gradual unfreezing)
    state = checkpoint.restore(found, model=run.model, optimizer=optimizer, scheduler=scheduler)
    run.step, run.history, run.count = state["step"], state["history"], state.get("count", 0)
    for hook in hooks:
        hook.load_state(state.get("hooks", {}).get(hook.name, {}), checkpoint.read_extra(found, hook.name))
    log(f"resumed from {found} after epoch {state['epoch'] + 1}/{len(epochs)}, step {run.step}/{run.total}")
    return state.get("partial", {})


def _save(checkpoint: Checkpointer, run: RunState, optimizer, scheduler, hooks, accelerator, partial: dict) -> None:
    if checkpoint.folder is not None and accelerator.is_main_process:
        hook_states, extra = {}, {}
        for hook in hooks:
            js, tensors = hook.state()
            hook_states[hook.name] = js
            if tensors:
                extra[hook.name] = tensors
        completed_epoch = run.epoch if not partial else run.epoch - 1
        checkpoint.save(weights=trainable_state(run.model), optimizer=optimizer, scheduler=scheduler,
                        state={"step": run.step, "epoch": completed_epoch, "history": run.history, "count": run.count,
                               "hooks": hook_states, "partial": partial}, extra=extra)
    accelerator.wait_for_everyone()


def _accumulate(sums: dict[str, float], stats: dict[str, float]) -> None:
    sums["_n"] = sums.get("_n", 0) + 1
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def _means(sums: dict[str, float]) -> dict[str, float]:
    n = max(1, sums.get("_n", 0))
    return {k: v / n for k, v in sums.items() if k != "_n"}


def _average_gradients(params: list[torch.Tensor], count: int) -> None:
    """Gradients averaged over processes, weighted by how many examples (tokens) each one's share held."""
    import torch.distributed as dist

    live = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
    flat = torch.cat([g.reshape(-1) for g in grads]) * float(count)
    weight = torch.tensor([float(count)], device=flat.device)
    dist.all_reduce(flat)
    dist.all_reduce(weight)
    flat /= weight.clamp_min(1.0)
    offset = 0
    for p in live:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _broadcast_from_main(model: nn.Module) -> None:
    """Every process starts from the main process's weights (a fresh head or adapter is random)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


def _broadcast_buffers(model: nn.Module) -> None:
    """BatchNorm statistics moved on each process's own share: keep the main process's, as DDP does."""
    import torch.distributed as dist

    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b, 0)
