"""Helpers that read a model's module tree: LoRA targets and the leftovers of a block partition.

Backbones describe themselves through `blocks()` and `lora_target_modules()`; these helpers
keep both generic, so a base resolved from an unknown folder gets them without special code.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


def suffix_targets(root: nn.Module, wanted: Callable[[str, nn.Module], bool]) -> list[str]:
    """PEFT `target_modules` entries selecting exactly the modules `wanted(name, module)` accepts.

    A short suffix (`"conv_pw"`) is used when every module with that last name component is
    wanted; otherwise the full names are listed, so a suffix never catches a module it should
    not (ResNet's `conv1` is a 7x7 stem conv and a 1x1 bottleneck conv). PEFT matches list
    entries as `key == entry or key.endswith("." + entry)`, so both forms keep working when
    the backbone is later nested inside a bigger module.

    >>> suffix_targets(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), lambda n, m: isinstance(m, nn.Linear))
    ['0']
    """
    by_suffix: dict[str, list[str]] = {}
    chosen: set[str] = set()
    for name, module in root.named_modules():
        if not name:
            continue
        by_suffix.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        if wanted(name, module):
            chosen.add(name)
    targets: list[str] = []
    for suffix, names in by_suffix.items():
        picked = [n for n in names if n in chosen]
        if not picked:
            continue
        targets.extend([suffix] if len(picked) == len(names) else picked)
    return targets


def leftover_modules(root: nn.Module, covered: Iterable[nn.Module]) -> nn.ModuleList:
    """The modules of `root` holding parameters that no module in `covered` holds.

    Used to build the last block (final norm, pooler, untied LM head) so that every parameter
    lands in exactly one block. Parameters are compared by identity, which makes tied weights
    (an LM head sharing the embedding matrix) count once, in the block that came first.
    """
    seen = {id(p) for m in covered for p in m.parameters()}
    rest = nn.ModuleList()
    for _, module in root.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if own:
            rest.append(module)
            seen.update(id(p) for p in module.parameters(recurse=False))
    return rest
