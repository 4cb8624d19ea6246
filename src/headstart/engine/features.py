"""Frozen-base features, extracted once and cached on disk.

Cache layout: `$HEADSTART_CACHE/features/<base key>/shard-*.safetensors`. The base key hashes
the base's weights sha256, its architecture and its preprocessing; each row is keyed by the
sha256 of the example's content (file bytes or text), so renaming a file costs nothing,
editing it re-extracts just that file, and any subset (few-shot samples, a new split) reuses
what is there. A shard's row keys live in its safetensors metadata: no pickle, no index file
to corrupt.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.storage import cache_dir
from .memory import Budget, human, plan_micro_batch, resolve_budget, rss_bytes


def base_key(backbone) -> str:
    info = backbone.info
    blob = json.dumps({"sha256": info.sha256, "arch": info.architecture, "pre": info.preprocessing,
                       "pooling": type(backbone).__name__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def item_key(item: Any, is_file: bool) -> str:
    """Content hash of one example: file bytes for a path, UTF-8 bytes for a text."""
    if is_file:
        with open(item, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return hashlib.sha256(("text:" + str(item)).encode()).hexdigest()


@torch.no_grad()
def encode(backbone, items: Sequence[Any], load: Callable[[Any], Any], batch_size: int = 64,
           progress: bool = True, desc: str = "features", budget: Budget | None = None) -> torch.Tensor:
    """Features [N, D] of `items` by the frozen backbone in eval mode (no cache), `batch_size` at most per
    forward (see `extraction_batch`: image bases take fewer when their activations or the `budget` say so)."""
    backbone.eval()
    batch_size = extraction_batch(backbone, batch_size, budget) if len(items) else batch_size
    out = []
    for start in tqdm(range(0, len(items), batch_size), disable=not progress, file=sys.stderr, desc=desc,
                      unit="batch", dynamic_ncols=True):
        chunk = [load(x) for x in items[start:start + batch_size]]
        out.append(backbone(**backbone.collate(chunk, False)).float())
    return torch.cat(out) if out else torch.zeros(0, backbone.feature_dim)


def extraction_batch(backbone, requested: int, budget: Budget | None = None) -> int:
    """Examples per forward when extracting features: `requested` at most, no more than the base's activation
    cap allows (bases/image.INFERENCE_ACTIVATIONS), and what `budget` leaves above what the process holds now
    (default: the run's default budget). Raises MemoryBudgetError up front when even one image does not fit.

    Text bases keep `requested`: their examples are short and their cost depends on each one's length.

    >>> extraction_batch(load_base("efficientnet-lite0"), 64)   # 224 px: 21 MB an image, 576 MB a forward
    27
    """
    if not hasattr(backbone, "example_bytes"):
        return requested
    cost = backbone.example_bytes()
    plan = plan_micro_batch(budget or resolve_budget(None), fixed=rss_bytes(), per_example={"eval": cost},
                            batch_size=requested, what=f"feature extraction ({human(cost)} an image)")
    return max(1, min(plan.micro_batch, inference_batch(backbone)))


def inference_batch(backbone) -> int:
    """The batch an image base runs inference in however many images it is given (bases/image.py)."""
    from ..bases.image import INFERENCE_ACTIVATIONS

    return max(1, INFERENCE_ACTIVATIONS // backbone.example_bytes())


def cached_features(backbone, items: Sequence[Any], load: Callable[[Any], Any], batch_size: int = 64,
                    progress: bool = True, use_cache: bool = True, store: bool = True,
                    budget: Budget | None = None) -> tuple[torch.Tensor, int]:
    """Features [N, D] for `items`, extracting only the rows not in the cache.

    `store=False` reads what the cache holds but never writes (prediction: a long-running server must
    not grow the cache without bound). Returns (features, number of rows extracted now).
    """
    if not use_cache:
        return encode(backbone, items, load, batch_size, progress, budget=budget), len(items)

    def extract(missing: list[int]) -> dict[str, torch.Tensor]:
        return {"final": encode(backbone, [items[i] for i in missing], load, batch_size, progress,
                                desc=f"features ({len(missing)} new)", budget=budget)}

    keys = _item_keys(backbone, items)
    known, extracted = _cached_rows({"final": layer_cache_dir(backbone, "final")}, keys, extract, store)
    if not keys:
        return torch.zeros(0, backbone.feature_dim), extracted
    return torch.stack([known["final"][k] for k in keys]), extracted


def layer_cache_dir(backbone, layer: str) -> Path:
    """"final" is the folder `cached_features` uses (a probe's features serve ranking and back)."""
    key = base_key(backbone)
    return cache_dir("features", key if layer == "final" else f"{key}-{layer}")


@torch.no_grad()
def cached_layer_features(backbone, items: Sequence[Any], load: Callable[[Any], Any], layers: Sequence[str],
                          batch_size: int = 64, progress: bool = True,
                          budget: Budget | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """({layer: features [N, D_layer]}, rows extracted now) for layers of `backbone.feature_layers()`.

    One forward pass per missing row yields every requested layer (`backbone.layer_features`);
    each layer has its own cache folder, so asking for more layers later re-extracts only rows
    some requested layer lacks.
    """
    unknown = sorted(set(layers) - set(backbone.feature_layers()))
    if unknown:
        raise ValueError(f"{backbone.info.name} has no feature layer(s) {unknown}; it has {backbone.feature_layers()}")

    def extract(missing: list[int]) -> dict[str, torch.Tensor]:
        backbone.eval()
        size = extraction_batch(backbone, batch_size, budget)
        chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        for start in tqdm(range(0, len(missing), size), disable=not progress, file=sys.stderr,
                          desc=f"{backbone.info.name} features ({len(missing)} new, {len(layers)} layers)",
                          unit="batch", dynamic_ncols=True):
            batch = [load(items[i]) for i in missing[start:start + size]]
            feats = backbone.layer_features(**backbone.collate(batch, False))
            for layer in layers:
                chunks[layer].append(feats[layer].float())
        return {layer: torch.cat(chunks[layer]) for layer in layers}

    keys = _item_keys(backbone, items)
    known, extracted = _cached_rows({layer: layer_cache_dir(backbone, layer) for layer in layers}, keys, extract)
    return {layer: torch.stack([known[layer][k] for k in keys]) for layer in layers}, extracted


def _item_keys(backbone, items: Sequence[Any]) -> list[str]:
    return [item_key(x, backbone.kind == "image") for x in items]  # image examples are paths, text ones texts


def _cached_rows(folders: dict[str, Path], keys: list[str], extract: Callable[[list[int]], dict[str, torch.Tensor]],
                 store: bool = True) -> tuple[dict[str, dict], int]:
    """({name: {row key: features}}, rows extracted now): what `folders` hold for `keys`, plus the
    rows any folder lacks, extracted by `extract(positions)` in one pass and (`store`) written as a new
    shard to every folder (a duplicated example is extracted and stored once)."""
    wanted = set(keys)
    known = {name: _load_rows(folder, wanted, remove_damaged=store) for name, folder in folders.items()}
    missing = [i for i, k in enumerate(keys) if any(k not in known[name] for name in folders)]
    if missing:
        fresh = extract(missing)
        first_row = {keys[i]: r for r, i in reversed(list(enumerate(missing)))}
        new_keys = list(first_row)
        for name, folder in folders.items():
            if store:
                _write_shard(folder, new_keys, fresh[name][[first_row[k] for k in new_keys]])
            for k, r in first_row.items():
                known[name][k] = fresh[name][r]
    return known, len(missing)


def _load_rows(folder: Path, wanted: set[str], remove_damaged: bool = True) -> dict[str, torch.Tensor]:
    rows: dict[str, torch.Tensor] = {}
    try:
        shards = sorted(folder.glob("shard-*.safetensors"))
    except OSError:  # an unreadable cache only costs the lookup
        return rows
    for shard in shards:
        try:
            with safe_open(shard, "pt") as f:
                keys = json.loads(f.metadata()["keys"])
                if not wanted.intersection(keys):
                    continue
                table = f.get_tensor("features")
        except Exception:  # a damaged file (writes are atomic, so not a half-written one): drop it for good
            if remove_damaged:  # (a reader that never writes leaves the cache as it found it)
                shard.unlink(missing_ok=True)  # its rows are re-extracted and written anew
            continue
        for r, k in enumerate(keys):
            if k in wanted:
                rows[k] = table[r]
    return rows


def _write_shard(folder: Path, keys: list[str], table: torch.Tensor) -> None:
    name = f"shard-{time.time_ns()}-{os.getpid()}.safetensors"
    tmp = folder / ("." + name + ".tmp")
    save_file({"features": table.contiguous()}, tmp, metadata={"keys": json.dumps(keys)})
    os.replace(tmp, folder / name)
