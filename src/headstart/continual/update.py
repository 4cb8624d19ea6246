"""`update`: one night of learning for a classifier specialist, accepted only if it forgets nothing that
matters.

    open the lineage -> read the night (minus what the journal says was learned) -> load the current
    version and its memory -> hold back a guard share of the night -> learn with the strategies ->
    measure every earlier night's guard set, before and after -> accept (write version n, switch the
    pointer, journal the examples) or retry once with 10x the penalties, then reject.

Nothing is written where the current version lives until the new one is complete: a kill at any
moment leaves the current version as it was, and the rerun resumes the training from its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError
from .memory import STORES, Memory

GUARD_SHARE = 0.2
"""Share of each labelled night held back as its guard set (at most memory.GUARD_CAP examples)."""


@dataclass
class UpdateOptions:
    strategy: str = "auto"
    unlabelled: bool = False
    replay_store: str = "auto"
    max_forgetting: float | None = 2.0
    time_budget_s: float | None = None
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"
    progress: bool = False
    log: Callable[[str], None] = print
    fresh_adapter: bool = False
    epochs: int | None = None
    """Passes over tonight's data (default: the method's own; 30 for a head on features)."""
    """lora: train a new adapter tonight beside the frozen old one, then fold both into one (rank grows)."""
    general_set: Path | None = None
    """sft bundles: held-out instructions whose loss the guard also watches (general ability)."""
    strategy_options: dict[str, Any] = field(default_factory=dict)


def update_specialist(bundle: Path, paths: list[Path], out: Path | None, opts: UpdateOptions) -> dict[str, Any]:
    """Learn the new examples in `paths`; returns the report (see the module docstring)."""
    from ..bundle.commands import load
    from ..bundle.lineage import Lineage
    from .night import read_night

    import sys

    t0 = time.perf_counter()
    opts = replace(opts, progress=opts.progress and sys.stderr.isatty())  # cron logs stay quiet
    lineage = Lineage.open(bundle)
    current = load(lineage.current_folder)
    if current.bundle_kind != "classifier":
        from .generator import update_generator

        return update_generator(lineage, current, paths, out, opts)
    night = read_night(paths, kind=current.kind, unlabelled=opts.unlabelled, learned=lineage.learned,
                       text_column=opts.text_column, label_column=opts.label_column)
    base_report = {"bundle": str(out or bundle), "previous": lineage.current, "examples": len(night),
                   "already_learned": night.already_learned, "skipped": night.skipped}
    if not len(night):
        return {**base_report, "accepted": False, "version": lineage.current, "nothing_new": True,
                "why": "nothing new: every example was learned before" if night.already_learned else "no examples"}
    memory = Memory.read(lineage.current_folder)  # read once: the store check and every attempt use it
    store = _store(opts.replay_store, current, memory)
    scenario = "unlabelled" if opts.unlabelled else (
        "class" if set(night.labels) - set(current.classes) else "domain")
    spec, why = _strategy(opts.strategy, scenario, store)
    _check_fresh_adapter(opts, current, spec)
    job = _Job(lineage, night, store, scenario, opts, fingerprint=_fingerprint(lineage, night, spec, opts))
    job.memory = memory
    outcome = job.attempt(current, spec, strength=1.0)
    retried = None
    if not outcome.passes(opts.max_forgetting):
        retried = retry_spec(spec)
        opts.log(f"update: {outcome.worst_text(opts.max_forgetting)}; retrying once with {retried} at 10x strength")
        outcome = job.attempt(load(lineage.current_folder), retried, strength=10.0)
    report = {**base_report, "scenario": scenario, "strategy": retried or spec, "why": why, "store": store,
              "retried": retried is not None, **outcome.summary()}
    entry = {"strategy": report["strategy"], "scenario": scenario, "nights": [night.fingerprint()],
             "metrics": {"accuracy": None if outcome.night_accuracy is None else outcome.night_accuracy / 100,
                         "night_accuracy": outcome.night_accuracy}, "guards": outcome.guards,
             "note": why}
    if not outcome.passes(opts.max_forgetting):
        why_rejected = outcome.worst_text(opts.max_forgetting)
        report.update(accepted=False, version=lineage.current, why_rejected=why_rejected)
        lineage.reject(entry, why=why_rejected)
        job.discard_checkpoints()
        report["wall_s"] = round(time.perf_counter() - t0, 3)
        return report
    version = job.commit(outcome, entry, out)
    report.update(accepted=True, version=version, wall_s=round(time.perf_counter() - t0, 3))
    return report


@dataclass
class Outcome:
    learner: Any
    memory: Memory
    guards: dict[str, dict[str, float | None]]
    """night -> {before, after, drop} in accuracy points."""
    night_accuracy: float | None
    history: list[dict]
    train_s: float
    trained_on: int
    held_back: int
    replayed: int
    dropped: int
    new_labels: list[str]

    def worst(self, max_forgetting: float = 0.0) -> tuple[str | None, float]:
        """The guard set whose drop most exceeds its tolerance, and its drop."""
        drops = [(k, g["drop"], g["drop"] - tolerance(max_forgetting, g.get("examples", 0)))
                 for k, g in self.guards.items() if g.get("drop") is not None]
        if not drops:
            return None, 0.0
        name, drop, _ = max(drops, key=lambda d: d[2])
        return name, drop

    def worst_text(self, max_forgetting: float = 0.0) -> str:
        name, drop = self.worst(max_forgetting)
        if name is None:
            return "no guard set"
        n = self.guards[name].get("examples", 0)
        return (f"guard set of night {name} dropped {drop:.1f} points (tolerance "
                f"{tolerance(max_forgetting, n):.1f} on its {n} examples)")

    def passes(self, max_forgetting: float | None) -> bool:
        if max_forgetting is None:
            return True
        return all(g["drop"] <= tolerance(max_forgetting, g.get("examples", 0))
                   for g in self.guards.values() if g.get("drop") is not None)

    def summary(self) -> dict[str, Any]:
        return {"guards": self.guards, "night_accuracy": self.night_accuracy, "trained_on": self.trained_on,
                "held_back": self.held_back, "replayed": self.replayed, "memory_dropped": self.dropped,
                "new_labels": self.new_labels, "train_s": round(self.train_s, 3)}


class _Job:
    """One update's state across its attempts: the night, the memory it starts from, checkpoints."""

    def __init__(self, lineage, night, store: str, scenario: str, opts: UpdateOptions, fingerprint: dict):
        self.lineage, self.night, self.store, self.scenario, self.opts = lineage, night, store, scenario, opts
        self.fingerprint = fingerprint
        self.train_idx, self.guard_idx = night.split_guard(GUARD_SHARE, opts.seed)
        self.checkpoints: list[Path] = []
        self.memory: Memory | None = None
        """The current version's memory, read (or seeded) once for every attempt; learn_night only fixes its
        scale when unset and builds the next version's memory as a copy."""

    def ctx(self, strength: float):
        return attempt_context(self.lineage.folder, {**self.fingerprint, "strength": strength}, self.opts,
                               self.checkpoints)

    def attempt(self, spec_obj, strategy: str, strength: float) -> Outcome:
        from .learn import learn_night

        memory = self.memory
        if memory is None:  # a bundle made by `fit`: seeded once, the retry reuses it
            from .seed import seed_memory

            from .classifier import ClassifierLearner

            features = ClassifierLearner(spec_obj, self.ctx(0.0)).features
            memory = self.memory = seed_memory(spec_obj, self.store, self.opts, self.lineage.current, features)
        return learn_night(spec_obj, memory, self, strategy, strength, self.ctx(strength))

    def commit(self, outcome: Outcome, entry: dict, out: Path | None) -> int:
        spec = outcome.learner.spec
        staged = self.lineage.stage(out)
        version = self.lineage._next_version(self.lineage._target(out))
        spec.manifest = {**spec.manifest, "history": outcome.history,
                         "metrics": {"accuracy": (outcome.night_accuracy or 0.0) / 100.0, "guards": outcome.guards,
                                     "night_examples": len(self.night)},
                         "continual": {"version": version, "parent": self.lineage.current, "scenario": self.scenario,
                                       "strategy": entry["strategy"], "store": self.store,
                                       "nights": [n.fingerprint for n in outcome.memory.nights]}}
        spec.save(staged)
        outcome.memory.write(staged, source_folder=self.lineage.current_folder)
        learned = [{"sha256": k, "path": s, "examples": 1}
                   for k, s in zip(self.night.keys, self.night.sources)]
        n = self.lineage.commit(staged, entry, learned, out=out)
        self.discard_checkpoints()
        return n

    def discard_checkpoints(self) -> None:
        discard_checkpoints(self.checkpoints)


def attempt_context(folder: Path, fingerprint: dict, opts: UpdateOptions, spent: list[Path]):
    """The FitContext of one attempt: its checkpoints beside the folder, named by the attempt's fingerprint
    (version, night, strategy, strength...), so a rerun of the same attempt resumes and any other starts
    fresh. The folder is added to `spent` (removed when the update ends)."""
    from ..methods.base import FitContext

    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    ckpt = folder.with_name(f".{folder.name}.update-{key}.checkpoint")
    spent.append(ckpt)
    return FitContext(seed=opts.seed, checkpoint_dir=ckpt, resume=True, progress=opts.progress, log=opts.log,
                      fingerprint=fingerprint)


def discard_checkpoints(spent: list[Path]) -> None:
    from ..core.storage import discard_dir

    for ckpt in spent:
        discard_dir(ckpt)


def tolerance(max_forgetting: float, examples: int) -> float:
    """The drop a guard set may show: `max_forgetting` points, but never less than one example's worth --
    on 20 held-back examples one flip is 5 points, and rejecting a night for it would be noise."""
    return max(max_forgetting, 100.0 / examples if examples else 0.0)


def _store(asked: str, spec, memory: Memory | None) -> str:
    """The store this update keeps: the one asked for, else the memory's own, else the default by method.
    A memory cannot turn into another kind (features cannot become the examples again), except `none`."""
    head_only = bool(spec.method.frozen_base) or spec.method.name == "setfit"
    if asked == "auto":
        return memory.store if memory is not None else ("features" if head_only else "refs")
    if memory is not None and asked not in (memory.store, "none"):
        raise ConfigError(f"this specialist's memory keeps {memory.store!r}; it cannot become {asked!r} "
                          "(pass --replay-store none to drop it, or start from a fresh bundle)")
    if asked not in STORES:
        raise ConfigError(f"unknown replay store {asked!r}: choose from auto, {', '.join(STORES)}")
    if asked == "features" and not head_only:
        raise ConfigError(f"replay store 'features' keeps what a frozen body reads; a {spec.method.name} "
                          "specialist changes its body, so it needs refs, raw or none")
    return asked


def _check_fresh_adapter(opts: UpdateOptions, spec, strategy: str) -> None:
    if not opts.fresh_adapter:
        return
    if spec.method.name != "lora":
        raise ConfigError(f"--fresh-adapter is for lora specialists; this one is {spec.method.name}")
    clash = {"ewc", "joint"} & set(strategy.split("+"))
    if clash:  # ewc's Fisher is per adapter column (it would not fit a grown rank); joint starts from the base
        raise ConfigError(f"--fresh-adapter does not combine with {', '.join(sorted(clash))}: the frozen old adapter "
                          "already keeps what earlier nights taught")


def _strategy(asked: str, scenario: str, store: str) -> tuple[str, str]:
    from .strategies import auto_strategy, parse_strategies

    if asked == "auto":
        return auto_strategy(scenario, store)
    parse_strategies(asked)  # a clear error for a bad name, before any work
    if store == "none" and any(n in asked.split("+") for n in ("replay", "joint")):
        raise ConfigError(f"strategy {asked!r} needs a memory of earlier nights; the replay store is 'none'")
    return asked, "chosen by the user"


def retry_spec(spec: str) -> str:
    """The retry's strategies: the same at 10x strength, plus L2-SP when nothing in them penalises change."""
    names = spec.split("+")
    if spec in ("naive", "joint"):
        return "l2sp"
    return spec if {"l2sp", "ewc", "lwf"} & set(names) else spec + "+l2sp"


def _fingerprint(lineage, night, spec: str, opts: UpdateOptions) -> dict[str, Any]:
    keys = hashlib.sha256("".join(night.keys).encode()).hexdigest()
    return {"version": lineage.current, "bundle": lineage.entry(lineage.current).get("bundle_sha256"),
            "night": keys, "strategy": spec, "seed": opts.seed, "options": opts.strategy_options,
            "unlabelled": opts.unlabelled, "store": opts.replay_store}


def seeded_rng(seed: int, salt: str) -> random.Random:
    return random.Random(f"{seed}:{salt}")

