"""`classify`: labelled images or texts -> a classifier `Specialist` (every method of `headstart methods`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, DataError
from .registry import FitSettings, Start, Task, register_task

DEFAULT_BASE = {"image": "efficientnet-lite0", "text": "minilm-l6"}
"""The base a classifier starts from when none is named, per data kind."""


def load_classification_data(data: Any, settings: FitSettings):
    """The `Dataset` to fit: loaded from a folder or table (or given), cut to `shots` per class when set."""
    from ..data import Dataset, load_dataset

    dataset = data if isinstance(data, Dataset) else load_dataset(
        data, text_column=settings.text_column, label_column=settings.label_column, seed=settings.seed,
        skip_placeholders=settings.skip_placeholders)
    return dataset if settings.shots is None else dataset.with_shots(settings.shots, settings.seed)


def prepare_base(base: Any, dataset, *, pretrained: bool = True, image_size: int | None = None):
    """The base a classifier trains on (fit, shots and adapt share this prelude): `base` loaded by name (the
    default for the data's kind when None) or used as given, checked against the data's kind, at `image_size`.

    >>> prepare_base(None, load_dataset("../shared/data/trec")).info.name
    'minilm-l6'
    """
    from ..bases import load_base
    from ..bases.backbone import Backbone

    name = base.info.name if isinstance(base, Backbone) else (base or DEFAULT_BASE[dataset.kind])
    backbone = base if isinstance(base, Backbone) else load_base(name, pretrained=pretrained)
    if (dataset.kind == "image") != (backbone.kind == "image"):
        raise DataError(f"{dataset.source} holds {dataset.kind} data but {name!r} is a {backbone.kind} base")
    if image_size:
        try:
            backbone.set_input_size(image_size)
        except ValueError as e:  # a text base, or a size the architecture cannot take
            raise ConfigError(str(e)) from None
    return backbone


class ClassifyTask(Task):
    summary = "labelled images or texts -> a classifier"
    default_method = "probe"
    inputs = frozenset({"shots", "target", "image_size"})

    def load_data(self, data, method, settings: FitSettings):
        from ..engine.perf import tune_allocator

        # The glibc tuning speeds up training through the base at the cost of memory: frozen-base methods
        # only run inference (nothing to gain) and methods that plan their memory decide it themselves.
        if not (method.frozen_base or getattr(method, "plans_memory", False)):
            tune_allocator()
        dataset = load_classification_data(data, settings)
        if method.needs_examples and not len(dataset.split("train")):
            raise DataError(f"method {method.name!r} needs labelled examples and {dataset.source} has none to train "
                            "on (shots=0); zero examples work with --method zeroshot")
        return dataset

    def start(self, base, init: Path | None, dataset, method, settings: FitSettings) -> Start:
        if init is not None:
            raise ConfigError("task classify cannot start from a bundle yet (init=); it starts from a base")
        details = {}
        if base == "auto":  # rank the built-in bases on this very training split, then fit the winner
            from ..transfer.rank import rank

            ranking = rank(dataset, progress=settings.progress, log=settings.log, seed=settings.seed)
            base = ranking.best().base
            settings.log(f"base auto: {base} ranks first by LogME ({ranking.best().logme:.4f}) of "
                         f"{', '.join(c.base for c in ranking.candidates)} in {ranking.wall_s:.1f} s; fitting it")
            details["base_ranking"] = ranking.to_json()
        backbone = prepare_base(base, dataset, pretrained=method.needs_pretrained, image_size=settings.image_size)
        target = _target_split(settings, dataset, method)
        return Start(backbone, backbone.info.to_json(), target=target, details=details)

    def fingerprint(self, dataset, start: Start, settings: FitSettings) -> dict[str, Any]:
        return {"data": dataset.source, "train": len(dataset.split("train")), "shots": settings.shots,
                "target": None if start.target is None else [str(settings.target), len(start.target)]}

    def artifact(self, result, dataset, start: Start, method, settings: FitSettings):
        from ..bundle.classifier import Specialist

        method = result.method or method  # `auto` picked and ran another method: the bundle is that method's
        config = result.config if result.config is not None else method.config
        manifest = {
            "task": self.name,
            "base": start.backbone.info.to_json(),
            "method": {"name": method.name, "config": config.to_json()},
            "classes": dataset.classes,
            "preprocessing": start.backbone.info.preprocessing,
            "seed": settings.seed,
            "data": {"source": dataset.source, "kind": dataset.kind, "train_examples": len(dataset.split("train")),
                     "splits": {k: len(v) for k, v in dataset.splits.items()}, "sampling": dataset.sampling,
                     "skipped": [list(s) for s in dataset.skipped], "odd_names": dataset.odd_names,
                     "columns": {"text_column": settings.text_column, "label_column": settings.label_column}},
            "history": result.history,
            "details": {**result.details, **start.details},
        }
        if result.training:  # how the engine ran it: processes, device, precision
            manifest["training"] = result.training
        specialist = Specialist(result.model, method, dataset.classes, manifest)
        specialist.is_main_process = result.is_main_process
        return specialist

    def evaluate(self, specialist, dataset, result, settings: FitSettings) -> dict[str, Any]:
        metrics = specialist.evaluate(dataset, progress=settings.progress)
        trainable = sum(p.numel() for p in specialist.model.parameters() if p.requires_grad)
        metrics.update(trainable_params=trainable,
                       trainable_pct=100.0 * trainable / max(1, specialist.manifest["base"].get("params") or 1),
                       train_s=round(result.train_s, 3), examples_per_s=round(result.examples_per_s, 2),
                       skipped=len(dataset.skipped), skipped_reasons=dataset.skipped_summary())
        return metrics

    def report(self, specialist, dataset) -> str:
        from ..core.report import format_report

        m = specialist.manifest
        return format_report(m["metrics"], f"{m['method']['name']} on {m['base']['name']} -> {dataset.source}")


def _target_split(settings: FitSettings, dataset, method):
    """The target examples a method receives: labels hidden unless it is `target-oracle`."""
    from ..data import Split
    from ..data.target import load_target

    target, needs = settings.target, getattr(method, "needs_target", False)
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
                             text_column=settings.text_column, label_column=settings.label_column,
                             seed=settings.seed, skip_placeholders=settings.skip_placeholders).pool
    if getattr(method, "uses_target_labels", False):
        return target
    return Split(list(target.items), [-1] * len(target))


register_task("classify", ClassifyTask())
