"""One attempt at learning a night: strategies -> hooks and data, training, the guard sets before and after,
and the memory the new version would carry."""
from __future__ import annotations

import copy
import time
from typing import Any

import torch

from .classifier import ClassifierLearner, HeadTraining, Readable, TimeBudget
from .memory import ExampleSet, Memory, NightRecord
from .night import resolve_examples


def learn_night(spec, memory: Memory, job, strategy: str, strength: float, ctx) -> Any:
    """Train `spec` (the current version, loaded fresh) on the job's night with `strategy`; returns an Outcome."""
    from .strategies import parse_strategies, scaled
    from .update import Outcome

    opts, night = job.opts, job.night
    names = strategy.split("+")
    configs = scaled(parse_strategies(strategy, **_options_for(names, opts.strategy_options)), strength)
    learner = ClassifierLearner(spec, ctx)
    if opts.fresh_adapter:  # tonight trains a new adapter beside the frozen old one (folded in after)
        from .fresh_adapter import add_fresh_adapter

        cfg = spec.method.resolved(learner.kind).config
        add_fresh_adapter(learner.model.backbone, rank=cfg.r, alpha=cfg.alpha)
    t0 = time.perf_counter()
    night_feats = learner.features(night.items) if learner.head_only else None
    train_idx, guard_idx, labels = _night_labels(learner, job, night_feats, memory)
    guard_sets = [(str(rec.night), _readable(learner, rec.guard, job)[0]) for rec in memory.nights]
    before = {name: learner.accuracy(r) for name, r in guard_sets}
    replay, dropped = (_readable(learner, memory.replay, job) if "replay" in names or "joint" in names
                       else (Readable([]), 0))
    if "replay" in names and not learner.head_only:
        replay = _capped(replay, max(len(train_idx), REPLAY_FLOOR), job)
    new_train = _subset(night.items, night_feats, train_idx)
    train_labels = [labels[i] for i in train_idx] + [learner.classes[y] for y in replay.labels]
    train_x = new_train.concat(Readable(list(replay.labels), replay.features, replay.items)) if len(replay) else new_train
    teacher = learner.logits(train_x) if "lwf" in configs else None
    anchor = {n: p.detach().clone() for n, p in learner.trainable().items()}
    fisher = _anchor_fisher(learner, memory, train_x, configs) if "ewc" in configs else None
    if learner.head_only and "joint" not in configs:  # the head trains in standardised space
        if memory.scale is None:  # fixed once per lineage: from the earliest features it has
            old = memory.replay if memory.replay.features is not None and len(memory.replay) > 1 else None
            memory.scale = learner.input_scale(old.features if old is not None else train_x.features)
        learner.standardize(memory.scale)
        anchor = learner.to_z(anchor)
        fisher = learner.to_z(fisher, fisher=True) if fisher is not None else None
    new_labels = learner.grow(train_labels, train_x, train_labels)
    train_x.labels = [learner.classes.index(y) for y in train_labels]
    history = _train(learner, train_x, configs, teacher, anchor, fisher, job, ctx, names)
    if opts.fresh_adapter:
        from .fresh_adapter import fold_fresh_adapter

        history = [*history, {"fresh_adapter": fold_fresh_adapter(learner.model.backbone)}]
    guards = {}
    for name, r in guard_sets:
        after = learner.accuracy(r)
        guards[name] = {"before": before[name], "after": after, "examples": len(r),
                        "drop": None if after is None or before[name] is None else round(before[name] - after, 2)}
    holdout = _subset(night.items, night_feats, guard_idx)
    holdout.labels = [learner.classes.index(labels[i]) for i in guard_idx]
    night_acc = learner.accuracy(holdout)
    new_memory = _next_memory(learner, memory, job, train_idx, guard_idx, labels, night_feats, configs, new_train)
    return Outcome(learner=learner, memory=new_memory, guards=guards, night_accuracy=night_acc, history=history,
                   train_s=time.perf_counter() - t0, trained_on=len(train_x), held_back=len(guard_idx),
                   replayed=len(replay), dropped=dropped, new_labels=new_labels)


REPLAY_FLOOR = 200
"""A body-training night replays at most max(its own size, this) kept examples, a fresh seeded sample each
night: a full 1000-example reservoir would make every night cost five nights' training."""


def _capped(replay: Readable, cap: int, job) -> Readable:
    if len(replay) <= cap:
        return replay
    from .update import seeded_rng

    idx = sorted(seeded_rng(job.opts.seed, f"replay-{job.lineage.current}").sample(range(len(replay)), cap))
    return Readable([replay.labels[i] for i in idx], None if replay.features is None else replay.features[idx],
                    None if replay.items is None else [replay.items[i] for i in idx])


def _options_for(names: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Only the options of strategies in this spec (`auto` may pick others than the flags were meant for)."""
    return {k: v for k, v in options.items() if k.split("_", 1)[0] in names}


def _night_labels(learner: ClassifierLearner, job, night_feats, memory: Memory) -> tuple[list[int], list[int], list[str]]:
    """(training indices, guard indices, label names per night example); an unlabelled night is labelled
    by the current version itself: confident, class-balanced pseudo-labels (selftrain's rule)."""
    night = job.night
    if night.labels is not None:
        return job.train_idx, job.guard_idx, list(night.labels)
    from ..methods.selftrain.config import SelftrainConfig
    from ..methods.selftrain.method import select_pseudo_labels

    cfg = SelftrainConfig()
    probs = learner.logits(Readable([0] * len(night), night_feats, None if night_feats is not None
                                    else list(night.items))).softmax(-1)
    seen = torch.tensor([float(memory.seen.get(c, 0)) for c in learner.classes])
    prior = seen / seen.sum() if seen.sum() > 0 else torch.full((len(learner.classes),), 1 / len(learner.classes))
    idx, pseudo = select_pseudo_labels(probs, prior, cfg.threshold, cfg.max_share)
    labels = ["?"] * len(night)
    for i, y in zip(idx, pseudo):
        labels[i] = learner.classes[y]
    job.opts.log(f"update: {len(idx)} of {len(night)} unlabelled examples pseudo-labelled "
                 f"(confidence >= {cfg.threshold}, class-balanced)")
    return sorted(idx), [], labels


def _subset(items: list, feats: torch.Tensor | None, idx: list[int]) -> Readable:
    chosen = [items[i] for i in idx]
    if feats is not None:
        return Readable([0] * len(idx), feats[torch.tensor(idx, dtype=torch.long)] if idx else feats[:0], None)
    return Readable([0] * len(idx), None, chosen)


def _readable(learner: ClassifierLearner, examples: ExampleSet, job) -> tuple[Readable, int]:
    """What the model reads for a memory's examples, labels limited to known classes; (readable, dropped)."""
    known = [i for i, y in enumerate(examples.labels) if y in learner.classes]
    examples = examples.subset(known)
    if examples.features is not None:
        return Readable([learner.classes.index(y) for y in examples.labels], examples.features.float(), None), 0
    items, labels, dropped = resolve_examples(examples, learner.kind, job.lineage.current_folder,
                                              job.opts.text_column, job.opts.label_column)
    return learner.readable(items, labels), dropped


def _anchor_fisher(learner, memory: Memory, train_x: Readable, configs) -> dict[str, torch.Tensor]:
    """The Fisher of the version being updated: carried in its memory (online EWC), else estimated now on
    the night's data under that version (a bundle made by `fit` carries none)."""
    if memory.fisher:
        return memory.fisher
    cfg = configs["ewc"]
    return learner.fisher(train_x, cfg.max_examples, seed=0)


def _train(learner: ClassifierLearner, data: Readable, configs, teacher, anchor, fisher, job, ctx, names) -> list[dict]:
    from .strategies import AnchorPenalty, Distillation

    if "joint" in configs:
        return _train_joint(learner, data, job, ctx)
    outputs: dict = {}
    params = learner.trainable()
    hooks: list = []
    anchored: set[str] = set()
    if "l2sp" in configs:
        hooks.append(AnchorPenalty(params, anchor, None, configs["l2sp"].weight, name="l2sp"))
        anchored |= set(anchor)
    if "ewc" in configs:
        hooks.append(AnchorPenalty(params, anchor, fisher, configs["ewc"].weight, name="ewc"))
        anchored |= set(fisher)
    if "lwf" in configs:
        hooks.append(Distillation(outputs, teacher, configs["lwf"].weight, configs["lwf"].temperature))
    if job.opts.time_budget_s:
        hooks.append(TimeBudget(job.opts.time_budget_s, job.opts.log))
    return learner.train(data, hooks, outputs, anchored, job.opts.seed, HeadTraining(), job.opts.epochs)


def _train_joint(learner: ClassifierLearner, data: Readable, job, ctx) -> list[dict]:
    """`joint`: everything the memory holds plus the night, from the base (the upper bound)."""
    from ..methods.heads import L2_GRID, set_linear
    from ..methods.probe.method import fit_head_with_l2_search

    if learner.head_only:
        w, b, l2, _ = fit_head_with_l2_search(data.features, data.labels, len(learner.classes), list(L2_GRID),
                                              None, 200, job.opts.seed)
        if learner.model.normalize:  # a cosine head reads normalised features: refit on those instead
            import torch.nn.functional as F

            z = F.normalize(data.features.float() - learner.model.center, dim=-1)
            w, b, l2, _ = fit_head_with_l2_search(z, data.labels, len(learner.classes), list(L2_GRID), None, 200,
                                                  job.opts.seed)
        set_linear(learner.model.head, w, b)
        return [{"joint_examples": len(data), "l2": l2}]
    from ..bases import load_base
    from ..data import Dataset, Split

    spec = learner.spec
    backbone = load_base(spec.manifest["base"]["name"], pretrained=spec.method.needs_pretrained)
    dataset = Dataset(learner.kind, list(learner.classes), {"train": Split(list(data.items), list(data.labels))},
                      source="joint")
    result = spec.method.fit(backbone, dataset, ctx)
    spec.model = learner.model = result.model
    return result.history


def _next_memory(learner: ClassifierLearner, memory: Memory, job, train_idx, guard_idx, labels, night_feats,
                 configs, new_train: Readable) -> Memory:
    """The memory the new version carries: earlier nights + tonight's guard set, the reservoir offered
    tonight's training examples, and (EWC) the online Fisher of the new weights."""
    from .fisher import accumulate_fisher
    from .update import seeded_rng

    night, store = job.night, job.store
    out = copy.copy(memory)
    out.store, out.kind, out.scale = store, learner.kind, memory.scale
    out.nights = list(memory.nights) if store != "none" else []
    if store == "none":  # the user asked to keep nothing: what earlier versions kept is not carried on
        out.replay, out.seen, out.fisher = ExampleSet(), {}, None
    else:
        guard = _as_stored(night, guard_idx, labels, night_feats, store)
        out.nights.append(NightRecord(len(memory.nights) + 1, job.lineage.current + 1, night.fingerprint(), guard))
        size = None if "joint" in configs else (configs["replay"].size if "replay" in configs else memory.replay_size
                                                or 1000)
        out.offer(_as_stored(night, train_idx, labels, night_feats, store), size,
                  seeded_rng(job.opts.seed, f"reservoir-{job.lineage.current}"))
    if "ewc" in configs:
        cfg = configs["ewc"]
        new_train.labels = [learner.classes.index(labels[i]) for i in train_idx]
        fresh = learner.fisher(new_train, cfg.max_examples, seed=job.opts.seed)
        out.fisher = accumulate_fisher(memory.fisher, fresh, cfg.decay)
    return out


def _as_stored(night, idx: list[int], labels: list[str], night_feats, store: str) -> ExampleSet:
    ex = night.as_examples(idx, "refs" if store == "features" else store)
    ex.labels = [labels[i] for i in idx]
    if store == "features":
        ex.refs = None
        ex.features = night_feats[torch.tensor(idx, dtype=torch.long)] if idx else night_feats[:0]
    return ex
