"""The public Python API; the CLI is a thin layer over these functions.

    import headstart
    spec = headstart.fit("../shared/data/hymenoptera", base="efficientnet-lite0", method="lora", out="runs/ants")
    spec.predict(["photo.jpg"])
    spec.evaluate("../shared/data/hymenoptera", split="val")["accuracy"]
    spec = headstart.load("runs/ants")
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .bases import load_base
from .bases.backbone import Backbone
from .core.storage import cache_dir
from .data import Dataset, Split, load_dataset
from .data.target import load_target
from .engine.perf import peak_memory_mb, tune_allocator
from .core.errors import ConfigError, DataError
from .methods.base import FitContext
from .methods.registry import make_method
from .core.report import format_report
from .bundle.classifier import Specialist

DEFAULT_BASE = {"image": "efficientnet-lite0", "text": "minilm-l6"}


def fit(data: str | Path | Dataset, base: "str | Backbone | None" = None, method: str = "probe", *,
        shots: int | None = None,
        seed: int = 0, out: str | Path | None = None, resume: bool = False, progress: bool = True,
        use_cache: bool = True, text_column: str = "text", label_column: str = "label",
        image_size: int | None = None, skip_placeholders: bool = True, log: Callable[[str], None] = print,
        target: "str | Path | Split | None" = None, task: str = "classify", **options: Any) -> "Specialist | Any":
    """Specialise `base` on `data` with `method`; save a bundle to `out` when given.

    `skip_placeholders=False` keeps images with very few colours (line art, synthetic icons) that
    are otherwise skipped as "image not found" placeholders.
    `image_size` trains and predicts image bases at that resolution (default: the base's own).
    `options` are the method's config fields (see `headstart methods` or the method's config
    dataclass), e.g. `epochs=5, lr=1e-4, unfreeze="2"`.
    `base="auto"` ranks the built-in bases of the data's kind by LogME on the training split (see
    `headstart.rank`), fits the best, and records the ranking in the manifest's details.
    `base` may also be a loaded `Backbone` (the harness passes copies of one it loaded once);
    trainable methods change it in place.
    `shots=0` keeps no training examples: only methods that need none (`zeroshot`, `auto`) run.
    `target` is unlabelled target-domain data for the adaptation methods (adabn, coral, dann, selftrain):
    a path (see `data.target.load_target`) or a `Split`; its labels reach only `target-oracle`.
    `headstart.adapt` wraps this with the source-only and oracle baselines and the gap report.
    `task="sft"` / `"dpo"` tunes a causal LM as a generator instead (`method` lora or qlora; `eval=` a
    held-out file; `base` for dpo may be an SFT bundle) and returns an `LMSpecialist`; see `headstart.llm`.

    >>> spec = fit("../shared/data/trec", base="minilm-l6", method="probe", shots=8, seed=1)
    >>> round(spec.manifest["metrics"]["accuracy"], 2)
    0.6...
    """
    if task != "classify":
        return _fit_generative(task, data, base, method, seed=seed, out=out, resume=resume, progress=progress,
                               log=log, **options)
    t0 = time.perf_counter()
    tune_allocator()
    dataset = data if isinstance(data, Dataset) else load_dataset(
        data, text_column=text_column, label_column=label_column, seed=seed, skip_placeholders=skip_placeholders)
    if shots is not None:
        dataset = dataset.with_shots(shots, seed)
    ranking = None
    if base == "auto":  # rank the built-in bases on this very training split, then fit the winner
        from .transfer.rank import rank

        ranking = rank(dataset, progress=progress, log=log, seed=seed)
        base = ranking.best().base
        log(f"base auto: {base} ranks first by LogME ({ranking.best().logme:.4f}) of "
            f"{', '.join(c.base for c in ranking.candidates)} in {ranking.wall_s:.1f} s; fitting it")
    base = base or DEFAULT_BASE[dataset.kind]
    spec_method = make_method(method, **options)
    if spec_method.needs_examples and not len(dataset.split("train")):
        raise DataError(f"method {method!r} needs labelled examples and {dataset.source} has none to train on "
                        "(shots=0); zero examples work with --method zeroshot")
    backbone = base if isinstance(base, Backbone) else load_base(base, pretrained=spec_method.needs_pretrained)
    if (dataset.kind == "image") != (backbone.kind == "image"):
        raise DataError(f"{dataset.source} holds {dataset.kind} data but {backbone.info.name!r} is a "
                        f"{backbone.kind} base")
    if image_size:
        try:
            backbone.set_input_size(image_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    target_split = _target_split(target, dataset, backbone.kind, spec_method, text_column, label_column, seed,
                                 skip_placeholders)
    fingerprint = {"base": backbone.info.sha256, "preprocessing": backbone.info.preprocessing, "method": method,
                   "options": _jsonable(options), "seed": seed,
                   "data": dataset.source, "train": len(dataset.split("train")), "shots": shots,
                   "target": None if target_split is None else [str(target), len(target_split)]}
    ckpt = _checkpoint_dir(out, fingerprint)
    ctx = FitContext(seed=seed, checkpoint_dir=ckpt, resume=resume, progress=progress, use_cache=use_cache,
                     log=log, fingerprint=fingerprint, target=target_split)
    torch.manual_seed(seed)
    result = spec_method.fit(backbone, dataset, ctx)
    if result.method is not None:  # `auto` picked and ran another method: the bundle is that method's
        spec_method, method = result.method, result.method.name
    model = result.model
    manifest = {
        "base": backbone.info.to_json(),
        "method": {"name": method, "config": spec_method.config_json()},
        "classes": dataset.classes,
        "preprocessing": backbone.info.preprocessing,
        "seed": seed,
        "data": {"source": dataset.source, "kind": dataset.kind, "train_examples": len(dataset.split("train")),
                 "splits": {k: len(v) for k, v in dataset.splits.items()}, "sampling": dataset.sampling,
                 "skipped": [list(s) for s in dataset.skipped], "odd_names": dataset.odd_names,
                 "columns": {"text_column": text_column, "label_column": label_column}},
        "history": result.history,
        "details": result.details if ranking is None else {**result.details, "base_ranking": ranking.to_json()},
    }
    specialist = Specialist(model, spec_method, dataset.classes, manifest)
    specialist.is_main_process = result.is_main_process
    metrics = specialist.evaluate(dataset, progress=progress)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics.update(
        trainable_params=trainable,
        trainable_pct=100.0 * trainable / max(1, backbone.info.params),
        wall_s=round(time.perf_counter() - t0, 3),
        train_s=round(result.train_s, 3),
        examples_per_s=round(result.examples_per_s, 2),
        peak_mem_mb=round(peak_memory_mb(), 1),
        skipped=len(dataset.skipped),
        skipped_reasons=dataset.skipped_summary(),
    )
    manifest["metrics"] = metrics
    if out is not None and result.is_main_process:
        saved = specialist.save(out)
        metrics = specialist.manifest["metrics"]  # the manifest as written (save re-reads it)
        metrics["bundle"] = str(saved)
    if result.is_main_process:  # the run finished: its resume checkpoints are spent
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(Path(str(ckpt) + ".old"), ignore_errors=True)
    if result.is_main_process:
        log(format_report(metrics, f"{method} on {backbone.info.name} -> {dataset.source}"))
    return specialist


def _target_split(target, dataset: Dataset, kind: str, method, text_column: str, label_column: str, seed: int,
                  skip_placeholders: bool) -> Split | None:
    """The target examples a method receives: labels hidden unless it is `target-oracle`."""
    needs = getattr(method, "needs_target", False)
    if target is None:
        if needs:
            raise ConfigError(f"method {method.name!r} adapts to a target domain: pass target data "
                              "(`headstart adapt --source S --target T`, or fit(..., target=T))")
        return None
    if not getattr(method, "accepts_target", False):
        raise ConfigError(f"method {method.name!r} does not use target data; the adaptation methods are "
                          "adabn, coral, dann, selftrain (and the source-only / target-oracle baselines)")
    if not isinstance(target, Split):
        target = load_target(target, classes=dataset.classes, kind=dataset.kind, unlabelled=True,
                             text_column=text_column, label_column=label_column, seed=seed,
                             skip_placeholders=skip_placeholders).pool
    if getattr(method, "uses_target_labels", False):
        return target
    return Split(list(target.items), [-1] * len(target))


def _fit_generative(task: str, data, base, method: str, **kwargs: Any):
    from .llm.config import TASKS

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; tasks: classify, {', '.join(TASKS)}")
    # No tune_allocator() for LLM tuning: on the alpaca LoRA epoch (smollm2-135m, 2 cores, same machine)
    # the never-unmapping heap fragmented to a 21.4 GB peak at 124.7 tokens/s, vs 18.1 GB at 122.3 without.
    if task == "sft":
        from .llm.sft import fit_sft

        return fit_sft(data, base=base or "smollm2-135m", method=method if method != "probe" else "lora", **kwargs)
    from .llm.dpo import fit_dpo

    return fit_dpo(data, base=base or "smollm2-135m", method=None if method == "probe" else method, **kwargs)


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


def _checkpoint_dir(out: str | Path | None, fingerprint: dict) -> Path:
    if out is not None:
        out = Path(out).resolve()
        return out.with_name(f".{out.name}.checkpoint")
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir("checkpoints") / key


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, default=str))
