"""A merge written as a normal bundle: a LoRA adapter of the chosen rank (truncated SVD of the merged
delta) or changed weights (finetune), one head or a head per task, re-estimated BatchNorm statistics; the
stored model is scored again, so the metrics are those of what was written, truncation included."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..bundle.classifier import Specialist
from ..core.storage import ADAPTER_DIR
from ..engine.features import encode
from ..methods.base import SpecialistModel
from ..methods.heads import set_linear
from ..methods.registry import make_method
from .final import Final
from .ingredients import Ingredient
from .scoring import TaskData, scores

PEFT_PREFIX = "backbone.base_model.model."
"""Where a base's own tensors sit in a LoRA specialist's state (PEFT wraps the base)."""


class _MergedSpecialist(Specialist):
    """Stores, beside what its method trains, the BatchNorm statistics re-estimated after the merge."""

    statistics: dict[str, torch.Tensor] = {}

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().trained_tensors(), **self.statistics}


def write_merged(out: Path, backbone, body, ings: list[Ingredient], tasks: list[TaskData], final: Final,
                 rank: int | None, report: dict[str, Any], log: Callable[[str], None]) -> tuple[Any, Any, str]:
    """Write the merge to `out`; returns (rank, energy kept, bundle path) for the report."""
    first = ings[0]
    names = list(final.heads) if len(final.heads) > 1 else None
    classes = _classes(ings, final)
    head = final.heads[next(iter(final.heads))] if final.heads else first.head
    with tempfile.TemporaryDirectory() as tmp:
        if first.method == "lora":
            model, method, rank_info, energy = _lora_model(Path(tmp), backbone, body, first, final, rank, len(classes))
        else:
            model, rank_info, energy = _finetune_model(backbone, final.deltas, len(classes)), None, None
            method = make_method(first.method, **first.manifest["method"]["config"])
        set_linear(model.head, head["head.weight"], head["head.bias"])
        stored = _score_stored(model, body.load, tasks, final)
        manifest = _manifest(ings, method, report, stored, rank_info, energy, classes)
        spec = _MergedSpecialist(model, method, classes, manifest)
        if first.method == "lora" and final.statistics:
            spec.statistics = {PEFT_PREFIX + k: v for k, v in final.statistics.items()}
        if names:
            spec.named_heads = {n: (_task_classes(ings, n), h) for n, h in final.heads.items()}
            spec.default_head = False
        path = spec.save(out)
    log(f"merged bundle written to {path}" + (f" (LoRA rank {rank_info}, energy kept {energy['min']:.4f} at least)"
                                              if energy else ""))
    return rank_info, energy, str(path)


def _lora_model(tmp: Path, backbone, body, first: Ingredient, final: Final, rank: int | None, num_classes: int):
    from .lora_delta import deltas_to_lora, write_lora

    modules = {name[:-len(".weight")]: d for name, d in final.deltas.items()}
    tensors, rank_pattern, energy = deltas_to_lora(modules, rank,
                                                   fan_in_fan_out=bool(first.adapter_config.get("fan_in_fan_out")))
    write_lora(tmp / ADAPTER_DIR, first.adapter_config, tensors, rank_pattern)
    top = max(rank_pattern.values(), default=1)
    config = {**first.manifest["method"]["config"], "r": top, "alpha": top}
    method = make_method("lora", **config)
    body.apply({})  # the pretrained weights back: PEFT adds the merged delta on top of them
    model = method.restore(backbone, num_classes, {}, tmp)
    if final.statistics:
        own = dict(model.backbone.named_buffers())
        with torch.no_grad():
            for name, value in final.statistics.items():
                own["base_model.model." + name].copy_(value)
    values = list(energy.values())
    return model, method, top, {"min": round(min(values), 6), "mean": round(sum(values) / len(values), 6)} if values else None


def _finetune_model(backbone, deltas: dict[str, torch.Tensor], num_classes: int) -> SpecialistModel:
    """The body already holds base + merged delta (and statistics); only what any specialist changed is
    marked trained (so it is stored)."""
    for name, p in backbone.named_parameters():
        p.requires_grad_(name in deltas)
    return SpecialistModel(backbone, num_classes)


@torch.no_grad()
def _score_stored(model: SpecialistModel, load, tasks: list[TaskData], final: Final) -> dict[str, Any]:
    """Every task's evaluation split through the model as it will be stored."""
    model.eval()
    out = {}
    for task in tasks:
        feats = encode(model.backbone, task.splits["eval"].items, load, 64, progress=False)
        out[task.name] = scores(feats, task.labels("eval"), final.heads[task.name], task.classes)
    return out


def _classes(ings: list[Ingredient], final: Final) -> list[str]:
    if final.heads and len(final.heads) > 1:
        return _task_classes(ings, next(iter(final.heads)))
    return list(ings[0].classes)


def _task_classes(ings: list[Ingredient], name: str) -> list[str]:
    return next((i.classes for i in ings if i.name == name), ings[0].classes)


def _manifest(ings, method, report, stored, rank_info, energy, classes) -> dict[str, Any]:
    first = ings[0].manifest
    tasks = report.get("tasks", {})
    metrics: dict[str, Any] = {}
    if len(tasks) == 1:
        only = next(iter(tasks.values()))
        metrics = {"accuracy": stored.get(next(iter(tasks)), only)["accuracy"],
                   "macro_f1": stored.get(next(iter(tasks)), only)["macro_f1"]}
    elif tasks:
        metrics = {"tasks": {n: stored.get(n, {"accuracy": t["accuracy"], "macro_f1": t["macro_f1"]})
                             for n, t in tasks.items()}}
        metrics["accuracy"] = round(sum(t["accuracy"] for t in metrics["tasks"].values()) / len(tasks), 4)
    merge_facts = {k: v for k, v in report.items() if k not in ("bundle",)}
    merge_facts.update(rank=rank_info, energy=energy, ingredients=[str(i.folder) for i in ings])
    return {
        "task": "classify", "base": first["base"], "method": {"name": method.name, "config": method.config_json()},
        "classes": classes, "preprocessing": first.get("preprocessing", {}), "seed": first.get("seed", 0),
        "data": {"source": ings[0].data_source or "", "columns": ings[0].columns,
                 "tasks": {i.name: {"source": i.data_source, "classes": i.classes} for i in ings}},
        "details": {"merge": _jsonable(merge_facts)}, "metrics": metrics,
    }


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
