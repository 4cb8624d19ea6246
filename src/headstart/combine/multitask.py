"""Multi-task training: several labelled datasets learned at once by one shared body and a head per task.

    spec = fit_multitask({"sst2": "../shared/data/sst2", "trec": "../shared/data/trec"}, base="minilm-l6",
                         method="lora", out="runs/multi")
    headstart.load("runs/multi", head="trec").predict(["Who wrote Hamlet ?"])   # ['HUM']

The body is the lora method's shared adapter (or the finetune method's unfrozen blocks); each step draws a task
by temperature sampling over task sizes and a batch of it (`multitask_parts.TaskMixture`, an engine batch plan)
and takes the cross-entropy through that task's head. Best-epoch selection uses the mean of the tasks' val
accuracy. The result is one normal classifier bundle with a named head per task (`default_head=False`).

Cheap to import: torch and the model code load inside `fit_multitask`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError, DataError

METHODS = ("lora", "finetune")
"""Methods with a body to share: a LoRA adapter, or unfrozen blocks."""


def fit_multitask(tasks: dict[str, str | Path], *, base: Any = None, method: str = "lora", seed: int = 0,
                  out: str | Path | None = None, shots: int | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, text_column: str = "text", label_column: str = "label",
                  image_size: int | None = None, temperature: float = 2.0, resume: bool = False,
                  use_cache: bool = True, skip_placeholders: bool = True, **options: Any):
    """Train one shared body with a head per task on `tasks` ({name: data}); save a bundle to `out` when given.

    Args:
        tasks: {task name: a folder or table of labelled examples}; names name the heads.
        base: The base (a registered name or a loaded Backbone); default: the data kind's default.
        method: `lora` (one shared adapter) or `finetune` (shared unfrozen blocks).
        seed: Seed of sampling, splits, initialisation, task draws and shuffling.
        out: Folder of the bundle to write (atomically); nothing is saved when unset.
        shots: Keep this many training examples per class of every task.
        temperature: Task sampling p_i ∝ n_i^(1/T): 1 = proportional to task size, larger = flatter, inf = uniform.
        resume: Continue an interrupted run from its checkpoint (beside `out`, else in the cache).
        use_cache: Reuse cached features of the untouched base (the heads' LP-FT probes).
        skip_placeholders: Image tasks: skip images with very few colours (hub placeholders).
        **options: The method's config fields (epochs, batch_size, lr, r, unfreeze, ...).

    >>> spec = fit_multitask({"a": "data/a", "b": "data/b"}, base="tiny-text", epochs=2)
    >>> spec.manifest["metrics"]["tasks"]["a"]["accuracy"]
    0.9...
    """
    import torch

    from ..engine.checkpoint import drop_checkpoints, run_checkpoint_dir
    from ..engine.perf import peak_memory_mb, tune_allocator
    from ..methods.registry import make_method
    from ..tasks.registry import FitSettings

    t0 = time.perf_counter()
    if method not in METHODS:
        raise ConfigError(f"multi-task training shares a body: method must be one of {', '.join(METHODS)}, "
                          f"got {method!r}")
    if len(tasks) < 2:
        raise ConfigError("multi-task training needs two or more tasks (for one, fit it alone)")
    tune_allocator()
    settings = FitSettings(seed=seed, shots=shots, text_column=text_column, label_column=label_column,
                           skip_placeholders=skip_placeholders)
    datasets = _load_tasks(tasks, settings)
    backbone = _base(base, datasets, image_size)
    trainer = make_method(method, "classify", **options).resolved(backbone.kind)
    fingerprint = _fingerprint(datasets, backbone, trainer, options, seed, shots, temperature)
    ckpt = run_checkpoint_dir(out, fingerprint)
    torch.manual_seed(seed)
    run = _train(datasets, backbone, trainer, seed, temperature, ckpt, fingerprint, resume, progress, use_cache, log)
    spec = _specialist(run, datasets, backbone, trainer, seed, temperature, text_column, label_column)
    spec.manifest["metrics"] = _evaluate(spec, run, datasets, progress, log)
    spec.manifest["metrics"].update(wall_s=round(time.perf_counter() - t0, 3), peak_mem_mb=round(peak_memory_mb(), 1))
    if spec.is_main_process:
        if out is not None:
            spec.manifest["metrics"]["bundle"] = str(spec.save(out))
        drop_checkpoints(ckpt)
        m = spec.manifest["metrics"]
        log(f"multi-task {trainer.name} on {backbone.info.name}: mean accuracy {m['accuracy']:.4f}, "
            f"mean macro-F1 {m['macro_f1']:.4f} over {len(datasets)} tasks")
    return spec


def _load_tasks(tasks: dict[str, str | Path], settings):
    from ..tasks.classify import load_classification_data

    datasets = {name: load_classification_data(str(data), settings) for name, data in tasks.items()}
    kinds = {d.kind for d in datasets.values()}
    if len(kinds) > 1:
        raise DataError(f"the tasks mix {' and '.join(sorted(kinds))} data; one shared body takes one kind")
    empty = [name for name, d in datasets.items() if not len(d.split("train"))]
    if empty:
        raise DataError(f"task {empty[0]!r} has no training examples (shots={settings.shots})")
    return datasets


def _base(base: Any, datasets: dict, image_size: int | None):
    from ..tasks.classify import prepare_base

    return prepare_base(base, next(iter(datasets.values())), image_size=image_size)


def _train(datasets, backbone, trainer, seed, temperature, ckpt, fingerprint, resume, progress, use_cache, log):
    """Prepare the shared body and the heads, then train them on the task mixture; returns the run's facts."""
    from ..data import loader_for
    from ..engine.checkpoint import Checkpointer
    from ..engine.schedule import warmup_cosine_schedule
    from ..engine.trainer import TrainSettings, train
    from ..methods.base import FitContext
    from ..methods.training import BestEpoch, init_head_from_probe
    from .multitask_parts import MultiTaskModel, TaskMixture, TaskView, mean_validation, mixture_step

    cfg, names = trainer.config, list(datasets)
    prepared = trainer.prepare(backbone, len(datasets[names[0]].classes), cfg)  # the method's own body
    model = MultiTaskModel(prepared.backbone, {n: len(datasets[n].classes) for n in names})
    splits = {n: datasets[n].selection_splits(seed, cfg.early_stopping) for n in names}
    trains = [splits[n][0] for n in names]
    vals = {n: splits[n][1] for n in names if splits[n][1] is not None and len(splits[n][1])}
    load = loader_for(backbone.kind)
    if cfg.head_init == "probe":  # LP-FT per task: each head starts as a probe on the untouched body's features
        ctx = FitContext(seed=seed, progress=progress, use_cache=use_cache, log=log)
        for name, split in zip(names, trains):
            init_head_from_probe(TaskView(model, name), split, len(datasets[name].classes), ctx)
    plan = TaskMixture([len(t) for t in trains], cfg.batch_size, cfg.epochs, seed, temperature)
    log("multi-task sampling: " + ", ".join(f"{n} {len(t)} examples p={p:.3f}"
                                             for n, t, p in zip(names, trains, plan.probabilities)))
    best = BestEpoch(mean_validation(model, vals, load, 64, cfg.label_smoothing), cfg.patience, cfg.epochs, log)
    result = train(model, plan=plan, step_loss=mixture_step(model, plan, names, trains, load, cfg.label_smoothing),
                   param_groups=trainer.param_groups(model, cfg),
                   settings=TrainSettings(lr_schedule=warmup_cosine_schedule(cfg.warmup_ratio), loss_key="train_loss"),
                   hooks=[best], set_mode=lambda epoch: trainer.set_mode(model, epoch),
                   checkpoint=Checkpointer(ckpt, fingerprint=fingerprint, resume=resume), progress=progress, log=log)
    return {"prepared": prepared, "model": model, "result": result, "best_epoch": best.best["epoch"],
            "plan": plan, "names": names, "vals": vals}


def _specialist(run, datasets, backbone, trainer, seed, temperature, text_column, label_column):
    """The bundle: the method's own model (shared body + the first task's head) with every task's head named."""
    from ..bundle.classifier import Specialist
    from ..engine.trainer import is_main_process
    from ..methods.heads import set_linear

    prepared, model, result, names = run["prepared"], run["model"], run["result"], run["names"]
    first = model.head[names[0]]
    set_linear(prepared.head, first.weight, first.bias)
    prepared.to(next(model.parameters()).device).eval()
    heads = {n: (list(datasets[n].classes), {"head.weight": model.head[n].weight.detach().cpu().clone(),
                                              "head.bias": model.head[n].bias.detach().cpu().clone()}) for n in names}
    plan, lead = run["plan"], datasets[names[0]]
    manifest = {
        "task": "classify", "base": backbone.info.to_json(),
        "method": {"name": trainer.name, "config": trainer.config.to_json()},
        "classes": list(lead.classes), "preprocessing": backbone.info.preprocessing, "seed": seed,
        "data": {"source": lead.source, "kind": lead.kind,
                 "train_examples": sum(len(d.split("train")) for d in datasets.values()),
                 "columns": {"text_column": text_column, "label_column": label_column},
                 "tasks": {n: {"source": d.source, "classes": list(d.classes), "train_examples": len(d.split("train")),
                               "splits": {k: len(v) for k, v in d.splits.items()}, "sampling": d.sampling}
                           for n, d in datasets.items()}},
        "history": result.history,
        "details": {"best_epoch": run["best_epoch"], "num_processes": result.num_processes,
                    "multitask": {"temperature": temperature, "tasks": names,
                                  "probabilities": dict(zip(names, [round(p, 6) for p in plan.probabilities])),
                                  "selection_examples": {n: len(run["vals"].get(n, ())) for n in names}}},
        "training": result.training_facts(),
    }
    spec = Specialist(prepared, trainer, list(lead.classes), manifest)
    spec.named_heads, spec.default_head = heads, False
    spec.is_main_process = result.is_main_process and is_main_process()
    return spec


def _evaluate(spec, run, datasets, progress: bool, log) -> dict[str, Any]:
    """Each task's evaluation split through its own head; the mean over tasks is the headline."""
    from ..methods.heads import set_linear

    model, head, classes = spec.model, spec.model.head, spec.classes
    per_task = {}
    try:
        for name, (task_classes, tensors) in spec.named_heads.items():
            own = type(head)(head.in_features, len(task_classes)).to(head.weight.device)
            set_linear(own, tensors["head.weight"], tensors["head.bias"])
            model.head, spec.classes = own, task_classes
            m = spec.evaluate(datasets[name], progress=progress)
            per_task[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "split": m["split"],
                              "examples": m.get("examples")}
            log(f"task {name}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} on its {m['split']} split")
    finally:
        model.head, spec.classes = head, classes
    result = run["result"]
    trainable = sum(p.numel() for p in run["model"].parameters() if p.requires_grad)
    mean = {k: round(sum(t[k] for t in per_task.values()) / len(per_task), 6) for k in ("accuracy", "macro_f1")}
    return {"tasks": per_task, **mean, "trainable_params": trainable,
            "trainable_pct": 100.0 * trainable / max(1, spec.manifest["base"].get("params") or 1),
            "train_s": round(result.train_s, 3), "examples_per_s": round(result.per_s, 2)}


def _fingerprint(datasets, backbone, trainer, options, seed, shots, temperature) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (data, base, method and options, seed, mixing)."""
    facts = {"task": "multitask", "base": backbone.info.sha256, "method": trainer.name, "options": options,
             "seed": seed, "shots": shots, "temperature": temperature,
             "tasks": {n: [d.source, len(d.split("train"))] for n, d in datasets.items()}}
    return json.loads(json.dumps(facts, default=str))


