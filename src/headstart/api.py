"""The public Python API; the CLI is generated from these functions' signatures and docstrings.

    import headstart
    spec = headstart.fit("../shared/data/hymenoptera", base="efficientnet-lite0", method="lora", out="runs/ants")
    spec.predict(["photo.jpg"])
    spec.evaluate("../shared/data/hymenoptera", split="val")["accuracy"]
    spec = headstart.load("runs/ants")

Importing this module stays cheap (no torch, no model code): `headstart --help` reads `fit`'s signature.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .bases.backbone import Backbone
    from .bundle.classifier import Specialist
    from .bundle.generator import LMSpecialist
    from .data import Dataset, Split


def fit(data: "str | Path | Dataset | None" = None, base: "str | Backbone | None" = None, method: str | None = None, *,
        task: str = "classify", tasks: "list[str] | dict[str, str] | None" = None, task_temperature: float = 2.0,
        init: str | Path | None = None, shots: int | None = None, eval: str | Path | None = None,
        target: "str | Path | Split | None" = None, seed: int = 0, out: str | Path | None = None, resume: bool = False,
        progress: bool = True, use_cache: bool = True, text_column: str = "text", label_column: str = "label",
        image_size: int | None = None, skip_placeholders: bool = True, memory_budget: str | int | None = None,
        log: Callable[[str], None] = print, **options: Any) -> "Specialist | LMSpecialist":
    """Specialise `base` on `data` for `task` with `method`; save a bundle to `out` when given.

    Args:
        data: Training data: labelled examples (classify: a folder or table, or a loaded `Dataset`), a JSONL
            file of instructions (sft) or of prompt/chosen/rejected pairs (dpo).
        base: The base model: a registered name (`headstart bases`), a local folder, a loaded `Backbone`
            (trainable methods change it in place), or `auto` (classify: rank the built-in bases of the
            data's kind by LogME on the training split and fit the best). Default: the task's default.
        method: How to specialise (`headstart methods`); default: the task's default (probe for classify,
            lora for sft and dpo, or the method of the `init` bundle).
        task: What is learned: `classify` (labels), `sft` (instruction tuning of an LLM), `dpo` (preferences).
        tasks: Multi-task instead of `data`: `name=data` pairs (or a dict) learned by one shared body with a
            head per task (`load(out, head=name)`, `predict --task name`).
        task_temperature: Multi-task: tasks are drawn in proportion to size^(1/T) (1: by size, large: uniform).
        init: A bundle to start from (dpo from an sft bundle; `base=<bundle>` also works): the manifest's `parent`.
        shots: classify: keep this many training examples per class (0: none; zeroshot and auto run).
        eval: sft/dpo: a held-out JSONL file (default: a seeded share of the training file).
        target: classify: unlabelled target-domain data for adabn, coral, dann, selftrain (a path or a
            `Split`); its labels reach only `target-oracle`. `headstart.adapt` wraps this with baselines.
        seed: Seed of sampling, splits, initialisation and shuffling.
        out: Folder of the bundle to write (atomically); nothing is saved when unset.
        resume: Continue an interrupted run from its checkpoint.
        progress: Show progress bars.
        use_cache: Reuse cached features of the frozen base.
        text_column: classify: the text column of a table.
        label_column: classify: the label column of a table.
        image_size: classify: train and predict image bases at this resolution (default: the base's own).
        skip_placeholders: classify: skip images of very few colours ("image not found"); False keeps line art.
        memory_budget: Peak memory to plan for (`6GB`): sets micro-batch and checkpointing, or refuses up front.
        log: Where progress lines go.
        **options: The method's config fields (`headstart methods`), e.g. `epochs=5, lr=1e-4, unfreeze="2"`.

    >>> fit("../shared/data/trec", base="minilm-l6", method="probe", shots=8).manifest["metrics"]["accuracy"]
    """
    from .engine.checkpoint import drop_checkpoints, run_checkpoint_dir
    from .engine.memory import resolve_budget
    from .engine.perf import peak_memory_mb
    from .engine.trainer import is_main_process
    from .methods.base import FitContext
    from .methods.registry import make_method
    from .tasks import FitSettings, get_task

    t0, budget = time.perf_counter(), resolve_budget(memory_budget)
    _refuse_lineage_out(out)
    if tasks or data is None:
        return _fit_tasks(data, tasks, dict(base=base, method=method or "lora", seed=seed, out=out, shots=shots, log=log,
            progress=progress, resume=resume, use_cache=use_cache, image_size=image_size, text_column=text_column,
            label_column=label_column, skip_placeholders=skip_placeholders, temperature=task_temperature), options)
    job = get_task(task)
    init, base = _starting_bundle(init, base)
    settings = FitSettings(seed=seed, progress=progress, log=log, shots=shots, target=target, eval=eval,
                           image_size=image_size, text_column=text_column, label_column=label_column,
                           skip_placeholders=skip_placeholders)
    job.check_inputs(settings)
    trainer = make_method(job.method_name(method, init), job.name, **options)
    dataset = job.load_data(data, trainer, settings)
    start = job.start(base, init, dataset, trainer, settings)
    fingerprint = _jsonable({"task": job.name, "base": start.base["sha256"], "method": trainer.name,
                             "preprocessing": start.base.get("preprocessing"), "options": options, "seed": seed,
                             "init": start.parent, **job.fingerprint(dataset, start, settings)})
    ckpt = run_checkpoint_dir(out, fingerprint)
    ctx = FitContext(seed=seed, checkpoint_dir=ckpt, resume=resume, progress=progress, use_cache=use_cache,
                     log=log, fingerprint=fingerprint, target=start.target, memory_budget=budget)
    _seed_torch(seed)
    result = trainer.fit(start.backbone, dataset, ctx)
    specialist = job.artifact(result, dataset, start, trainer, settings)
    metrics = job.evaluate(specialist, dataset, result, settings)
    metrics.update(wall_s=round(time.perf_counter() - t0, 3), peak_mem_mb=round(peak_memory_mb(), 1))
    specialist.manifest["metrics"] = metrics
    # Under `accelerate launch` only the main process saves and reports (every process fits the same way).
    specialist.is_main_process = result.is_main_process and is_main_process()
    if specialist.is_main_process:
        if out is not None:
            saved = job.save(specialist, dataset, Path(out), settings)
            specialist.manifest["metrics"]["bundle"] = str(saved)  # the manifest as written (save re-reads it)
        drop_checkpoints(ckpt)  # the run finished: its resume checkpoints are spent
        log(job.report(specialist, dataset))
    return specialist


def load(folder: str | Path, base: Any = None, **options: Any) -> "Specialist | Any":
    """Load a bundle written by `fit(..., out=folder)`: a classifier `Specialist`, or an `LMSpecialist`
    for sft/dpo bundles (the manifest's `kind` decides).

    `base`: an already loaded base to share between specialists instead of loading one per bundle.
    `options`: `head=` for a classifier bundle with several heads, `adapter=` for a generator's adapter.

    >>> base = headstart.load_base("minilm-l6")
    >>> topic, tone = headstart.load("runs/topic", base=base), headstart.load("runs/tone", base=base)
    """
    from .bundle.commands import load as load_bundle

    return load_bundle(folder, base=base, **options)


def evaluate(bundle: "str | Path | Specialist", data: str | Path, split: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Evaluate a bundle (a folder or a loaded specialist) on held-out data: accuracy and F1 for a
    classifier on a dataset split, loss and perplexity for a generator on an instruction file."""
    from .bundle.commands import evaluate as evaluate_bundle

    return evaluate_bundle(bundle, data, split, progress=progress)


def update(bundle: str | Path, data: "str | Path | list[str | Path] | None" = None, *, strategy: str = "auto",
           unlabelled: bool = False, out: str | Path | None = None, replay_store: str = "auto",
           max_forgetting: float | None = 2.0, watch: str | Path | None = None, time_budget_s: float | None = None,
           fresh_adapter: bool = False, epochs: int | None = None,
           general_set: str | Path | None = None, seed: int = 0, text_column: str = "text",
           label_column: str = "label", l2sp_weight: float | None = None, ewc_weight: float | None = None,
           ewc_decay: float | None = None, ewc_max_examples: int | None = None, lwf_weight: float | None = None,
           lwf_temperature: float | None = None, replay_size: int | None = None, progress: bool = False,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Teach a specialist tonight's new data as a new version, without forgetting what it knew.

    The night's examples that were learned before are skipped (a journal of content hashes); a share is
    held back as tonight's guard set; the specialist learns the rest with `strategy`; then every earlier
    night's guard set is measured before and after. If one drops more than `max_forgetting` points, the
    update is retried once with 10x the penalties, then rejected (the current version stays). Accepted:
    the new version is written completely, then becomes current (`history`, `rollback`, `diff`).

    Args:
        bundle: The specialist: a bundle folder from `fit`, or a folder of its versions.
        data: Tonight's files: a table (`text,label`), an image folder (`<class>/*`), or several; new
            labels grow the head. Unlabelled (with `unlabelled`): texts alone or loose images.
        strategy: `auto` (chosen by scenario; the report says why), `naive`, `l2sp`, `ewc`, `replay`,
            `lwf`, `joint`, or several joined by `+` (`replay+lwf`).
        unlabelled: The night has no labels: the specialist labels its confident examples itself,
            class-balanced (as `selftrain` does).
        out: Write the new version into this folder instead (the versions so far are copied there).
        replay_store: What the memory keeps of each night: `auto` (frozen-base features for a probe,
            file references + hashes for a specialist whose body changes), `features`, `refs`, `raw`
            (the examples themselves: opt in), `none`.
        max_forgetting: Most accuracy points an earlier night's guard set may drop (None: measure, never reject).
        watch: A folder that fills up: learn the examples in it not learned before, then exit.
        time_budget_s: Stop training at the first epoch end past this many seconds.
        epochs: Passes over tonight's data (default: the method's own; 30 for a head on features).
        fresh_adapter: lora specialists: train a new adapter tonight beside the frozen old one, then fold
            both into one adapter (exactly their sum; its rank grows by r per night).
        general_set: sft bundles: a held-out instruction file whose loss must not rise either (general
            ability, as PEFT measures forgetting).
        seed: Seed of the guard split, the reservoir and training.
        text_column: The text column of the night's tables.
        label_column: The label column of the night's tables.
        l2sp_weight: L2-SP's pull towards the previous weights (default 0.01).
        ewc_weight: EWC's lambda (default 100).
        ewc_decay: Online EWC: how much of the earlier nights' Fisher carries over (default 0.9).
        ewc_max_examples: Examples the Fisher is estimated on (default 200).
        lwf_weight: Weight of the distillation of the previous version's outputs (default 1.0).
        lwf_temperature: Its softmax temperature (default 2.0).
        replay_size: Examples the replay memory keeps, shared by the classes (default 1000).
        progress: Show progress bars (off by default: nightly jobs log quietly).
        log: Where progress lines go.

    >>> report = update("runs/intents", "tonight.csv")
    >>> report["accepted"], report["version"], report["strategy"]
    (True, 2, 'replay')
    """
    from .continual.update import UpdateOptions, update_specialist
    from .core.errors import ConfigError

    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else list(data or []))]
    if watch is not None:
        paths.append(Path(watch))
    if not paths:
        raise ConfigError("nothing to learn: give the night's data (a file or folder) or --watch DIR")
    if max_forgetting is not None and not max_forgetting >= 0:
        raise ConfigError(f"max_forgetting must be >= 0 points, got {max_forgetting}")
    options = {"l2sp_weight": l2sp_weight, "ewc_weight": ewc_weight, "ewc_decay": ewc_decay,
               "ewc_max_examples": ewc_max_examples, "lwf_weight": lwf_weight, "lwf_temperature": lwf_temperature,
               "replay_size": replay_size}
    opts = UpdateOptions(strategy=strategy, unlabelled=unlabelled, replay_store=replay_store,
                         max_forgetting=max_forgetting, time_budget_s=time_budget_s, seed=seed,
                         fresh_adapter=fresh_adapter, epochs=epochs,
                         text_column=text_column, label_column=label_column, progress=progress, log=log,
                         general_set=Path(general_set) if general_set is not None else None,
                         strategy_options={k: v for k, v in options.items() if v is not None})
    return update_specialist(Path(bundle), paths, Path(out) if out is not None else None, opts)


def history(bundle: str | Path) -> list[dict[str, Any]]:
    """The versions of a specialist: when, from what parent, by which strategy, on how many examples, and
    their figures on every guard set; the current one is marked."""
    from .bundle.lineage_views import history as lineage_history

    return lineage_history(bundle)


def rollback(bundle: str | Path, to: int) -> int:
    """Make version `to` of a specialist current again (no version is deleted); returns it."""
    from .bundle.lineage_views import rollback as lineage_rollback

    return lineage_rollback(bundle, to)


def diff(bundle: str | Path, a: int, b: int) -> dict[str, Any]:
    """What changed from version `a` to version `b`: labels added or removed, metrics, guard figures."""
    from .bundle.lineage_views import diff as lineage_diff

    return lineage_diff(bundle, a, b)


def _fit_tasks(data: Any, tasks: Any, settings: dict[str, Any], options: dict[str, Any]) -> "Specialist":
    """`fit(tasks=...)`: one shared body and a head per task (combine/multitask.py)."""
    from .combine.multitask import fit_multitask
    from .core.errors import ConfigError

    if data is not None:
        raise ConfigError("give the training data either as DATA or as --tasks name=data ..., not both")
    if not tasks:
        raise ConfigError("no training data: give DATA (a folder or table), or --tasks name=data ...")
    return fit_multitask(_named_tasks(tasks), **settings, **options)


def _named_tasks(tasks: "list[str] | dict[str, str]") -> dict[str, str]:
    """`["sst2=../data/sst2", ...]` (or a dict) -> {name: data}; names are plain (they name the heads)."""
    import re

    from .core.errors import ConfigError

    pairs = list(tasks.items()) if isinstance(tasks, dict) else [str(t).partition("=")[::2] for t in tasks]
    out: dict[str, str] = {}
    for name, path in pairs:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or "") or not path:
            raise ConfigError(f"--tasks takes name=data pairs with plain names (letters, digits, _ . -); got "
                              f"{name!r}={path!r}")
        if name in out:
            raise ConfigError(f"task {name!r} is given twice")
        out[name] = str(path)
    if len(out) < 2:
        raise ConfigError("multi-task training needs two or more tasks (for one, give DATA)")
    return out


def _refuse_lineage_out(out: str | Path | None) -> None:
    """A folder of versions (`update`) is never overwritten by a fit: that would drop every version."""
    from .bundle.lineage import is_lineage
    from .core.errors import ConfigError

    if out is not None and is_lineage(out):
        raise ConfigError(f"{out} holds the versions of an updated specialist; a fit there would replace them "
                          "all. Choose another --out, or `headstart update` it")


def _starting_bundle(init: str | Path | None, base: Any) -> tuple[Path | None, Any]:
    """(init bundle, base): a bundle folder passed as `base` (the older spelling) is the `init`; a folder of
    versions (`update`) starts from its current version."""
    from .bundle.lineage import is_lineage, resolve_bundle

    if init is None and isinstance(base, (str, Path)) and (
            (Path(base) / "manifest.json").is_file() or is_lineage(base)):
        init, base = base, None
    return (resolve_bundle(init) if init is not None else None), base


def _seed_torch(seed: int) -> None:
    """Seed torch (head / adapter init, dropout) so a run is reproducible and a resumed one continues it."""
    import torch

    torch.manual_seed(seed)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
