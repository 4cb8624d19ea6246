"""What a merge reads from each specialist: its task vector in weight space, its head, its data.

A task vector is the change a specialist made to its base's weights, keyed by the base parameter it
changes (`blocks.5.conv_pw.weight`): for a LoRA bundle the exact delta B·A·scale of every adapted module
(`lora_delta`), so merging never adds the cross-terms that combining A's and B's separately does; for a
finetune bundle the stored weights minus the base's. Heads are separate: they have no pretrained value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bases.image import feature_view_of
from ..bundle.format import ADAPTER_DIR, read_manifest, read_trained
from ..bundle.lineage import resolve_bundle
from ..core.errors import BundleError, ConfigError

BODY_METHODS = ("lora", "finetune")
"""Methods whose change to the base is a task vector this module can read."""
HEAD_ONLY = ("probe",)
"""Methods that leave the base untouched: merging them merges heads only."""


@dataclass
class Ingredient:
    """One specialist, as a merge sees it."""

    folder: Path
    name: str
    """The task's name in a merged bundle (the folder's name, made unique)."""
    manifest: dict[str, Any]
    classes: list[str]
    head: dict[str, torch.Tensor]
    """`head.weight` [C, D] and `head.bias` [C]."""
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    """Base parameter name -> change to it (dense, the parameter's shape)."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """Finetune bundles: the BatchNorm statistics they store, by base buffer name (averaged, not merged)."""
    adapter_config: dict[str, Any] | None = None
    """LoRA bundles: the PEFT adapter_config.json (the merged adapter's template)."""

    @property
    def method(self) -> str:
        return self.manifest["method"]["name"]

    @property
    def data_source(self) -> str | None:
        return self.manifest.get("data", {}).get("source")

    @property
    def columns(self) -> dict[str, str]:
        return self.manifest.get("data", {}).get("columns", {})


def read_ingredients(folders: list[str | Path], base_state: dict[str, torch.Tensor] | None = None) -> list[Ingredient]:
    """Read and check the specialists of one merge: classifiers by one method on the same base weights.

    `base_state`: the base's state dict, needed to take finetune bundles' task vectors.
    """
    if len(folders) < 1:
        raise ConfigError("merge needs at least one specialist bundle")
    out: list[Ingredient] = []
    names: set[str] = set()
    for given in folders:
        folder = resolve_bundle(given)
        m = read_manifest(folder)
        if m["kind"] != "classifier":
            raise BundleError(f"{given}: a {m['kind']} bundle; merge combines classifier specialists")
        method = m["method"]["name"]
        if method not in BODY_METHODS + HEAD_ONLY:
            raise BundleError(f"{given}: made by {method!r}; merge reads {', '.join(BODY_METHODS + HEAD_ONLY)} "
                              "specialists")
        trained = read_trained(folder)
        head = {k: trained[k] for k in ("head.weight", "head.bias") if k in trained}
        if len(head) != 2:
            raise BundleError(f"{given}: its stored head is incomplete (needs head.weight and head.bias)")
        ing = Ingredient(folder=folder, name=_unique(_task_name(Path(given)), names), manifest=m,
                         classes=list(m["heads"].get("default", next(iter(m["heads"].values())))["classes"]),
                         head=head)
        if method == "lora":
            _read_lora(ing)
        elif method == "finetune":
            _read_finetune(ing, trained, base_state)
        out.append(ing)
    _check_compatible(out)
    return out


def _read_lora(ing: Ingredient) -> None:
    from .lora_delta import lora_deltas, read_lora

    adapter = read_lora(ing.folder / ADAPTER_DIR)
    ing.adapter_config = adapter.config
    ing.deltas = {f"{path}.weight": delta for path, delta in lora_deltas(adapter).items()}


def _read_finetune(ing: Ingredient, trained: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor] | None) -> None:
    if base_state is None:
        raise ConfigError("finetune task vectors need the base's weights")
    prefix = "backbone."
    for key, value in trained.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in base_state:
            raise BundleError(f"{ing.folder}: stores {key!r}, which its base does not have")
        if value.is_floating_point() and _is_statistic(name):
            ing.buffers[name] = value.float()
        elif value.is_floating_point():
            ing.deltas[name] = value.float() - base_state[name].float()


def _is_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var"))


def _check_compatible(ings: list[Ingredient]) -> None:
    first = ings[0]
    for ing in ings[1:]:
        if ing.manifest["base"]["sha256"] != first.manifest["base"]["sha256"]:
            raise BundleError(f"{ing.folder}: trained on other base weights than {first.folder} "
                              f"({ing.manifest['base']['name']} vs {first.manifest['base']['name']}); "
                              "only specialists of one base merge")
        if ing.method != first.method:
            raise BundleError(f"{ing.folder}: made by {ing.method}, {first.folder} by {first.method}; "
                              "merge specialists of one method")
        size = ing.manifest.get("preprocessing", {}).get("input_size")
        if size != first.manifest.get("preprocessing", {}).get("input_size"):
            raise BundleError(f"{ing.folder}: trained at input size {size}, {first.folder} at "
                              f"{first.manifest.get('preprocessing', {}).get('input_size')}")
        view, first_view = (feature_view_of(i.manifest.get("preprocessing", {})) for i in (ing, first))
        if view != first_view:
            raise BundleError(f"{ing.folder}: trained on the {view!r} feature view, {first.folder} on {first_view!r}")


def same_labels(ings: list[Ingredient]) -> bool:
    """True when every specialist predicts the same label set (then their heads merge into one)."""
    return all(set(i.classes) == set(ings[0].classes) for i in ings)


def aligned_head(ing: Ingredient, classes: list[str]) -> dict[str, torch.Tensor]:
    """`ing`'s head with its rows in the order of `classes` (same label set, maybe another order)."""
    order = [ing.classes.index(c) for c in classes]
    return {"head.weight": ing.head["head.weight"][order], "head.bias": ing.head["head.bias"][order]}


def _task_name(folder: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", folder.resolve().name).strip("-.") or "task"
    return name if re.match(r"[A-Za-z0-9]", name) else f"t{name}"


def _unique(name: str, taken: set[str]) -> str:
    out, i = name[:60], 2
    while out in taken:
        out, i = f"{name[:56]}-{i}", i + 1
    taken.add(out)
    return out
