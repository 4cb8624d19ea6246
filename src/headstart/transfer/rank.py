"""Rank candidate bases (and their layers) for a labelled dataset, without fine-tuning anything.

    ranking = headstart.rank("../shared/data/flowers17", bases=["efficientnet-lite0", "efficientnet-lite2"])
    ranking.best().base, ranking.table()

Each candidate (base, layer) is scored on the frozen features of the training split (from the
feature cache, so ranking N bases costs N feature extractions, and a later `probe` on the winner
extracts nothing): LogME, H-score and leave-one-out kNN accuracy for every candidate; LEEP and NCE
too where the base carries its pre-training classifier (the ImageNet head) and the layer is the one
that classifier reads ("final").
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from ..data.sampling import stratified_subsample
from .scores import hscore, knn_accuracy, leep, logme, nce

DEFAULT_CANDIDATES = {"image": ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"],
                      "text": ["minilm-l6", "mpnet-base", "smollm2-135m"]}
SCORE_NAMES = ("logme", "nce", "leep", "hscore", "knn")


@dataclass
class Candidate:
    """One (base, layer) and its scores; None where a score does not apply (no source classifier)."""

    base: str
    layer: str
    feature_dim: int
    logme: float
    nce: float | None
    leep: float | None
    hscore: float
    knn: float
    seconds: float
    """Time to compute this candidate's scores from its features."""
    extract_s: float
    """Feature time of its base in this run (shared by all its layers; ~0 when cached)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ranking:
    data: str
    examples: int
    classes: int
    by: str
    candidates: list[Candidate]
    """Best first (by `by`)."""
    wall_s: float
    extracted: dict[str, int] = field(default_factory=dict)
    """Base -> rows whose features were extracted in this run (0: all from the cache)."""

    def best(self) -> Candidate:
        return self.candidates[0]

    def to_json(self) -> dict[str, Any]:
        return {"candidates": [c.to_json() for c in self.candidates], "by": self.by, "data": self.data,
                "examples": self.examples, "classes": self.classes, "wall_s": round(self.wall_s, 3),
                "extracted": self.extracted}

    def table(self) -> str:
        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        rows = [f"{'#':>2}  {'base':<20} {'layer':<10} {'dim':>5} {'logme':>8} {'nce':>7} {'leep':>7} "
                f"{'hscore':>8} {'knn':>6} {'s':>6}"]
        for i, c in enumerate(self.candidates, 1):
            rows.append(f"{i:>2}  {c.base:<20} {c.layer:<10} {c.feature_dim:>5} {f(c.logme, '.4f'):>8} "
                        f"{f(c.nce, '.3f'):>7} {f(c.leep, '.3f'):>7} {f(c.hscore, '.3f'):>8} {f(c.knn, '.3f'):>6} "
                        f"{c.seconds:>6.2f}")
        return "\n".join(rows)


def rank(data: "str | Path | Any", bases: Sequence[str] | str | None = None, layers: Sequence[str] | str = "final", *,
         by: str = "logme", split: str = "train", max_examples: int = 4000, knn_k: int = 5, seed: int = 0,
         progress: bool = True, log: Callable[[str], None] = print) -> Ranking:
    """Score every (base, layer) candidate on `data`'s `split`; best first by `by`.

    `bases`: names (or a comma-separated string); default: the built-in bases of the data's kind.
    `layers`: "final" (each base's features as `fit` uses them), "all" (every layer a base offers:
    `Backbone.feature_layers()`), or layer names. `max_examples` caps the rows scored (a seeded,
    class-stratified sample) so ranking a big dataset stays seconds once features are cached.

    >>> r = rank("../shared/data/hymenoptera", bases="efficientnet-lite0,efficientnet-lite1", progress=False)
    >>> [c.base for c in r.candidates]  # doctest: +SKIP
    ['efficientnet-lite1', 'efficientnet-lite0']
    """
    from ..bases import load_base
    from ..data import Dataset, load_dataset
    from ..engine.features import cached_layer_features
    from ..data import loader_for

    if by not in SCORE_NAMES:
        raise ConfigError(f"rank by one of {', '.join(SCORE_NAMES)}, not {by!r}")
    t0 = time.perf_counter()
    dataset = data if isinstance(data, Dataset) else load_dataset(data, seed=seed)
    names = _names(bases) or _default_candidates(dataset.kind, log)
    train = _stratified(dataset.split(split), max_examples, seed)
    labels = np.asarray(train.labels)
    if len(np.unique(labels)) < 2:
        raise DataError(f"{dataset.source}: ranking needs at least 2 classes in the {split!r} split")
    log(f"rank: {len(names)} base(s) on {len(train)} {split} examples of {dataset.source} "
        f"({len(dataset.classes)} classes), best first by {by}")
    candidates: list[Candidate] = []
    extracted: dict[str, int] = {}
    for name in names:
        backbone = load_base(name)
        if (dataset.kind == "image") != (backbone.kind == "image"):
            raise DataError(f"{dataset.source} holds {dataset.kind} data but {name!r} is a {backbone.kind} base")
        wanted = _layers(layers, backbone.feature_layers(), name)
        t = time.perf_counter()
        feats, extracted[name] = cached_layer_features(backbone, train.items, loader_for(backbone.kind), wanted,
                                                       progress=progress)
        extract_s = time.perf_counter() - t
        source_probs = _source_probs(backbone, feats["final"]) if "final" in feats else None
        for layer in wanted:
            candidates.append(_score(name, layer, feats[layer], labels, source_probs if layer == "final" else None,
                                     knn_k, seed, extract_s))
        log(f"  {name}: {len(wanted)} layer(s), features {extract_s:.1f} s ({extracted[name]} extracted)")
        del backbone
    candidates.sort(key=lambda c: -np.inf if getattr(c, by) is None else getattr(c, by), reverse=True)
    return Ranking(dataset.source, len(train), len(dataset.classes), by, candidates, time.perf_counter() - t0,
                   extracted)


def _score(base: str, layer: str, x: torch.Tensor, labels: np.ndarray, source_probs: np.ndarray | None,
           knn_k: int, seed: int, extract_s: float) -> Candidate:
    t = time.perf_counter()
    feats = x.double().numpy()
    scores: dict[str, float | None] = {"logme": logme(feats, labels), "hscore": hscore(feats, labels),
                                       "knn": knn_accuracy(feats, labels, k=knn_k, seed=seed),
                                       "leep": None, "nce": None}
    if source_probs is not None:
        scores["leep"] = leep(source_probs, labels)
        scores["nce"] = nce(source_probs.argmax(1), labels)
    return Candidate(base=base, layer=layer, feature_dim=int(x.shape[1]), seconds=round(time.perf_counter() - t, 4),
                     extract_s=round(extract_s, 3), **scores)


@torch.no_grad()
def _source_probs(backbone, final: torch.Tensor) -> np.ndarray | None:
    """Softmax of the pre-training classifier (e.g. ImageNet's 1000 classes) on the final features."""
    head = backbone.source_classifier()
    if head is None:
        return None
    head.eval()
    return torch.softmax(head(final.float()).double(), dim=1).numpy()


def _default_candidates(kind: str, log: Callable[[str], None]) -> list[str]:
    """The built-in candidates, less those that would start a download (mpnet-base's 439 MB) to be ranked."""
    from ..bases import get_base_spec

    names = []
    for name in DEFAULT_CANDIDATES[kind]:
        spec = get_base_spec(name)
        if spec is not None and spec.downloads_on_first_use and spec.missing():
            log(f"rank: {name} left out (not fetched yet; --bases {name} includes it and downloads it once)")
        else:
            names.append(name)
    return names


def _names(bases: Sequence[str] | str | None) -> list[str]:
    if bases is None:
        return []
    names = [b.strip() for b in (bases.split(",") if isinstance(bases, str) else bases) if b and b.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"a base is listed twice: {names}")
    return names


def _layers(spec: Sequence[str] | str, available: list[str], base: str) -> list[str]:
    if spec == "all":
        return list(available)
    wanted = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ConfigError(f"{base} has no layer(s) {', '.join(missing)}; its layers: {', '.join(available)}")
    return wanted


def _stratified(split, cap: int, seed: int):
    """`cap` rows, every class keeping its share and at least 2 rows where it has them; seeded."""
    if len(split) <= cap:
        return split
    return split.subset(stratified_subsample(np.asarray(split.labels), cap, seed, min_per_class=2).tolist())
