"""`update` for generator bundles (sft): one night of instruction rows, accepted only if the held-out answer
loss of every earlier night (and of a general-ability set, when given) does not rise too much.

    open lineage -> the night's rows minus the journal's -> the current version's memory (a fit-made bundle:
    seeded from the data its manifest records) -> hold back a guard share -> continue the adapter with
    the strategies -> loss on every guard set before and after: a rise above max_forgetting percent ->
    retry once at 10x strength -> reject; accepted: write version n, switch the pointer, journal the rows.

A guard's "drop" is the relative loss rise in percent, 100 * (after - before) / before: the same
`max_forgetting` number reads "points of accuracy" for a classifier and "percent of loss" here.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .generator_data import (InstructionNight, ROW_LABEL, convert_store, read_instruction_night, read_rows,
                             resolve_rows)
from .memory import Memory, NightRecord

GENERATOR_STRATEGIES = ("naive", "l2sp", "ewc", "lwf", "replay", "joint")
GUARD_SHARE = 0.2
GENERAL = "general"
"""The guard name of the general-ability set (`general_set`)."""


def update_generator(lineage, current, paths: list[Path], out: Path | None, opts) -> dict[str, Any]:
    """Learn the new instruction rows in `paths` into a new version of the generator `current`."""
    t0 = time.perf_counter()
    night = read_instruction_night(paths, lineage.learned)
    base_report = {"bundle": str(out or lineage.folder), "previous": lineage.current, "examples": len(night),
                   "already_learned": night.already_learned, "skipped": night.skipped}
    if not len(night):
        return {**base_report, "accepted": False, "version": lineage.current, "nothing_new": True,
                "why": "nothing new: every example was learned before" if night.already_learned else "no examples"}
    store = generator_store(opts.replay_store)
    spec, why = generator_strategy(opts.strategy, store)
    job = _GeneratorJob(lineage, current, night, store, opts, spec)
    outcome = job.attempt(spec, strength=1.0)
    retried = None
    if not outcome.passes(opts.max_forgetting):
        from .update import retry_spec

        retried = retry_spec(spec)
        opts.log(f"update: {outcome.worst_text()} > {opts.max_forgetting}%; retrying once with {retried} "
                 "at 10x strength")
        outcome = job.attempt(retried, strength=10.0)
    report = {**base_report, "scenario": "generative", "strategy": retried or spec, "why": why, "store": store,
              "retried": retried is not None, **outcome.summary()}
    entry = {"strategy": report["strategy"], "scenario": "generative", "nights": [night.fingerprint()],
             "metrics": {"loss": outcome.night_loss, "night_loss": outcome.night_loss}, "guards": outcome.guards,
             "note": why}
    if not outcome.passes(opts.max_forgetting):
        report.update(accepted=False, version=lineage.current, why_rejected=outcome.worst_text())
        lineage.reject(entry, why=outcome.worst_text())
        job.discard_checkpoints()
    else:
        report.update(accepted=True, version=job.commit(outcome, entry, out))
    report["wall_s"] = round(time.perf_counter() - t0, 3)
    return report


def generator_store(asked: str) -> str:
    from .memory import STORES

    if asked == "auto":
        return "refs"
    if asked not in STORES:
        raise ConfigError(f"unknown replay store {asked!r}: choose from auto, {', '.join(STORES)}")
    if asked == "features":
        raise ConfigError("replay store 'features' keeps what a frozen body reads; a generator's adapter changes "
                          "what it reads, so it needs refs, raw or none")
    return asked


def generator_strategy(asked: str, store: str) -> tuple[str, str]:
    from .strategies import auto_strategy, parse_strategies

    if asked == "auto":
        return auto_strategy("generative", store)
    names = list(parse_strategies(asked))  # a clear error for a bad name, before any work
    unsupported = [n for n in names if n not in GENERATOR_STRATEGIES]
    if unsupported:
        raise ConfigError(f"strategy {unsupported[0]!r} is not available for generator bundles: use "
                          f"{', '.join(GENERATOR_STRATEGIES)} (joined by '+')")
    if store == "none" and {"replay", "joint"} & set(names):
        raise ConfigError(f"strategy {asked!r} needs a memory of earlier nights; the replay store is 'none'")
    return asked, "chosen by the user"


@dataclass
class GeneratorOutcome:
    memory: Memory
    guards: dict[str, dict[str, float | None]]
    """guard name -> {before, after, drop}: losses, drop = relative rise in percent."""
    night_loss: float | None
    night_loss_before: float | None
    history: list[dict]
    train_s: float
    trained_on: int
    held_back: int
    replayed: int
    dropped: int

    def worst(self) -> tuple[str | None, float]:
        drops = [(k, g["drop"]) for k, g in self.guards.items() if g.get("drop") is not None]
        return max(drops, key=lambda kv: kv[1]) if drops else (None, 0.0)

    def worst_text(self) -> str:
        name, drop = self.worst()
        if name is None:
            return "no guard set"
        what = "the general-ability set" if name == GENERAL else f"guard set of night {name}"
        return f"{what}: held-out loss rose {drop:.1f}%"

    def passes(self, max_forgetting: float | None) -> bool:
        return max_forgetting is None or self.worst()[1] <= max_forgetting

    def summary(self) -> dict[str, Any]:
        return {"guards": self.guards, "night_accuracy": None, "night_loss": self.night_loss,
                "night_loss_before": self.night_loss_before, "trained_on": self.trained_on,
                "held_back": self.held_back, "replayed": self.replayed, "memory_dropped": self.dropped,
                "new_labels": [], "train_s": round(self.train_s, 3)}


def _options_for(strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    """Only the options of strategies in this spec (`auto`, or the retry, may pick others than the flags named)."""
    names = strategy.split("+")
    return {k: v for k, v in options.items() if k.split("_", 1)[0] in names}


class _GeneratorJob:
    """One update's state across its attempts: the learner (one model, restored for a retry), the night,
    the memory it starts from, the guard sets measured once on the current version."""

    def __init__(self, lineage, current, night: InstructionNight, store: str, opts, spec: str):
        from .generator_data import seed_generator_memory
        from .generator_train import GeneratorLearner

        self.lineage, self.night, self.store, self.opts = lineage, night, store, opts
        self.learner = GeneratorLearner(current)
        self.checkpoints: list[Path] = []
        self.memory = Memory.read(lineage.current_folder) or seed_generator_memory(current, store, opts,
                                                                                  lineage.current)
        self.train_idx, self.guard_idx = night.split_guard(GUARD_SHARE, opts.seed)
        self.guard_rows, self.dropped = {}, 0
        for rec in self.memory.nights:
            rows, dropped = resolve_rows(rec.guard)
            self.guard_rows[str(rec.night)], self.dropped = rows, self.dropped + dropped
        general = getattr(opts, "general_set", None)
        if general is not None:
            self.guard_rows[GENERAL] = read_rows(Path(general))[0]
        self.before = {name: self.learner.loss(rows) for name, rows in self.guard_rows.items()}
        self.holdout = [night.rows[i] for i in self.guard_idx]
        self.night_before = self.learner.loss(self.holdout) if self.holdout else None
        self.fingerprint = {"version": lineage.current, "bundle": lineage.entry(lineage.current).get("bundle_sha256"),
                            "night": hashlib.sha256("".join(night.keys).encode()).hexdigest(), "strategy": spec,
                            "seed": opts.seed, "options": opts.strategy_options, "store": opts.replay_store}

    def ctx(self, strength: float):
        from .update import attempt_context

        return attempt_context(self.lineage.folder, {**self.fingerprint, "strength": strength}, self.opts,
                               self.checkpoints)

    def attempt(self, strategy: str, strength: float) -> GeneratorOutcome:
        from .fisher import accumulate_fisher
        from .strategies import parse_strategies, scaled

        opts, night, learner = self.opts, self.night, self.learner
        learner.restore(learner.start)  # a retry starts from the current version again
        configs = scaled(parse_strategies(strategy, **_options_for(strategy, opts.strategy_options)), strength)
        t0 = time.perf_counter()
        train_rows = [night.rows[i] for i in self.train_idx]
        kept, dropped = resolve_rows(self.memory.replay) if {"replay", "joint", "ewc"} & set(configs) else ([], 0)
        replay_rows = kept if {"replay", "joint"} & set(configs) else []
        fisher = None
        if "ewc" in configs:  # the version being updated: carried (online EWC), else estimated now on what it
            # learned from (the reservoir of earlier nights), or on tonight's rows when nothing was kept
            fisher = self.memory.fisher or learner.fisher(kept or train_rows, configs["ewc"].max_examples, seed=0)
        if "joint" in configs:  # the upper bound: a fresh adapter on everything kept
            learner.fresh_adapter(opts.seed)
        history = learner.train(train_rows + replay_rows, configs, fisher, self.ctx(strength), opts)
        guards = {}
        for name, rows in self.guard_rows.items():
            before, after = self.before[name], learner.loss(rows)
            drop = None if before is None or after is None or before <= 0 else round(100 * (after - before) / before, 2)
            guards[name] = {"before": before, "after": after, "drop": drop}
        memory = self._next_memory(configs, train_rows)
        if "ewc" in configs:
            fresh = learner.fisher(train_rows, configs["ewc"].max_examples, seed=opts.seed)
            memory.fisher = accumulate_fisher(self.memory.fisher, fresh, configs["ewc"].decay)
        return GeneratorOutcome(memory=memory, guards=guards,
                                night_loss=learner.loss(self.holdout) if self.holdout else None,
                                night_loss_before=self.night_before, history=history,
                                train_s=time.perf_counter() - t0, trained_on=len(train_rows) + len(replay_rows),
                                held_back=len(self.guard_idx), replayed=len(replay_rows),
                                dropped=self.dropped + (dropped if replay_rows else 0))

    def _next_memory(self, configs: dict, train_rows: list[dict]) -> Memory:
        """Earlier nights + tonight's guard set; the reservoir offered tonight's training rows."""
        import copy

        from .update import seeded_rng

        memory = copy.deepcopy(self.memory)
        if memory.store != self.store:  # the user changed the store: what is kept follows it from tonight
            memory.replay = convert_store(memory.replay, self.store)
            for rec in memory.nights:
                rec.guard = convert_store(rec.guard, self.store)
        memory.store, memory.kind = self.store, "instruction"
        if self.store == "none":
            return memory
        night = self.night
        memory.nights.append(NightRecord(len(memory.nights) + 1, self.lineage.current + 1, night.fingerprint(),
                                         night.as_examples(self.guard_idx, self.store)))
        size = None if "joint" in configs else (
            configs["replay"].size if "replay" in configs else (memory.replay_size or 1000))
        memory.offer(night.as_examples(self.train_idx, self.store), size,
                     seeded_rng(self.opts.seed, f"reservoir-{self.lineage.current}"))
        return memory

    def commit(self, outcome: GeneratorOutcome, entry: dict, out: Path | None) -> int:
        spec = self.learner.spec
        staged = self.lineage.stage(out)
        version = self.lineage._next_version(self.lineage._target(out))
        spec.manifest = {**spec.manifest, "history": outcome.history,
                         "metrics": {"eval_loss": outcome.night_loss, "eval_loss_before": outcome.night_loss_before,
                                     "guards": outcome.guards, "night_examples": len(self.night)},
                         "continual": {"version": version, "parent": self.lineage.current, "scenario": "generative",
                                       "strategy": entry["strategy"], "store": self.store,
                                       "nights": [n.fingerprint for n in outcome.memory.nights]}}
        spec.save(staged)
        outcome.memory.write(staged, source_folder=self.lineage.current_folder)
        learned = [{"sha256": k, "path": s, "examples": 1} for k, s in zip(self.night.keys, self.night.sources)]
        n = self.lineage.commit(staged, entry, learned, out=out)
        self.discard_checkpoints()
        return n

    def discard_checkpoints(self) -> None:
        from .update import discard_checkpoints

        discard_checkpoints(self.checkpoints)


__all__ = ["update_generator", "generator_store", "generator_strategy", "GENERATOR_STRATEGIES", "ROW_LABEL"]
