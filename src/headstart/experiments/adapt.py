"""Unsupervised domain adaptation, end to end: source-only, adapted and target-oracle, measured on the target.

    import headstart
    run = headstart.adapt("../shared/data/amazon_multidomain/books_train.csv",
                          "../shared/data/amazon_multidomain/kitchen_train.csv",
                          target_test="../shared/data/amazon_multidomain/kitchen_test.csv",
                          base="minilm-l6", method="dann", out="runs/books2kitchen")
    run.report["accuracy"], run.report["source_only_accuracy"], run.report["gap_closed"]

Three fits on independent copies of one loaded base, with the same backbone mode and training
options: `source-only` (labelled source), the adaptation method (labelled source + unlabelled target)
and `target-oracle` (labelled target, when the target has labels). All three are evaluated on the
target test split; the share of the gap closed is (adapted - source_only) / (oracle - source_only).
The bundle written to `out` is the adapted model's, with the report in its manifest.

The guard (on by default): an adaptation can make a model worse on the target, and a user without target
labels cannot see it. A seeded CHECK_SHARE of the unlabelled target is held back from every method, and
label-free checks on it (`adapt_checks`) compare the adapted model with source-only; when the adapted
model's estimated target accuracy is not higher, source-only is shipped and the report says why.
`method="auto"` fits every adaptation the base allows and ships the one the checks rank first.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..api import fit
from ..data.target import load_target
from ..core.errors import ConfigError
from ..methods.adaptation import AdaptationMethod, fresh_copy
from ..methods.registry import get_method_spec
from ..bundle.classifier import Specialist
from ..tasks import FitSettings
from ..tasks.classify import load_classification_data, prepare_base

if TYPE_CHECKING:
    from ..bases.backbone import Backbone

BASELINES = ("source-only", "target-oracle")
CHECK_SHARE = 0.2
"""The share of the unlabelled target the guard keeps from the methods to check them on."""
AUTO = ("adabn", "coral", "dann", "selftrain")
"""What `method="auto"` tries (adabn only on a base with BatchNorm)."""
ADAPTIVE = (*AUTO, "source-only", "auto")
"""What `adapt` runs as its method: the adaptation methods, the source-only baseline alone, or auto."""


@dataclass
class AdaptResult:
    specialist: Specialist
    """The adapted specialist (bundle at `report['bundle']` when `out` was given)."""
    report: dict[str, Any]
    """source_only_accuracy, accuracy, oracle_accuracy, gap_closed, ... (also in the bundle's manifest)."""
    baselines: dict[str, Specialist] = field(default_factory=dict)
    """The source-only and oracle specialists: pass them back as `baselines=` to reuse them."""


def adapt(source: str | Path, target: str | Path, base: "str | Backbone | None" = None, method: str = "selftrain", *,
          target_test: str | Path | None = None, target_unlabelled: bool = False, oracle: bool | None = None,
          seed: int = 0, out: str | Path | None = None, resume: bool = False, progress: bool = True,
          use_cache: bool = True, text_column: str = "text", label_column: str = "label",
          image_size: int | None = None, skip_placeholders: bool = True, log: Callable[[str], None] = print,
          baselines: dict[str, Specialist] | None = None, guard: bool = True, **options: Any) -> AdaptResult:
    """Adapt a specialist trained on labelled `source` data to the unlabelled `target` domain.

    `method`: selftrain, coral, dann, adabn (image bases with BatchNorm), source-only, or auto (fit every
    method the base allows and ship the one the label-free checks rank first).
    `target_test`: labelled target data to measure on (default: the target's own held-out split).
    `target_unlabelled`: the target may have no labels at all (no oracle, and no target accuracy
    without `target_test`). Target labels never reach the adaptation method.
    `oracle`: train the target-oracle reference (default: whenever the target has labels).
    `options`: the method's config fields, e.g. `backbone="lora", epochs=3`; the baselines get the
    ones their config shares (backbone mode, epochs, lr ...), so all three train alike.
    `baselines`: specialists from an earlier run with the same source/target/options, reused.
    `guard`: ship source-only when the label-free checks estimate the adapted model less accurate on the
    target (the report's `guard` says which model was shipped and why); `method="auto"` always decides so.

    >>> run = adapt("books_train.csv", "kitchen_train.csv", target_test="kitchen_test.csv", method="coral")
    >>> sorted(k for k in run.report if k.endswith("accuracy"))
    ['accuracy', 'oracle_accuracy', 'source_only_accuracy']
    """
    t0 = time.perf_counter()
    if method != "auto":
        method_cls = get_method_spec(method).method_cls
        if not issubclass(method_cls, AdaptationMethod) or method == "target-oracle":
            raise ConfigError(f"{method!r} is not an adaptation method; use one of {', '.join(ADAPTIVE)}")
    cols = {"text_column": text_column, "label_column": label_column}
    data = load_classification_data(source, FitSettings(seed=seed, skip_placeholders=skip_placeholders, **cols))
    tgt = load_target(target, classes=data.classes, kind=data.kind, test=target_test, unlabelled=target_unlabelled,
                      seed=seed, skip_placeholders=skip_placeholders, **cols)
    loaded = prepare_base(base, data, image_size=image_size)
    log(f"adapt: {len(data.split('train'))} labelled source examples ({data.source}), {len(tgt.pool)} target "
        f"examples ({tgt.source}{', labels hidden from the method' if tgt.labelled else ', unlabelled'}), "
        f"target test: {len(tgt.test.split('test')) if tgt.test else 0} examples")
    want_oracle = tgt.labelled if oracle is None else oracle
    if want_oracle and not tgt.labelled:
        raise ConfigError("oracle=True needs target labels, and the target has none")
    common = {"seed": seed, "progress": progress, "use_cache": use_cache, "resume": resume, "log": log,
              "skip_placeholders": skip_placeholders, **cols}

    guarded = method == "auto" or (guard and method != "source-only")
    adapt_pool, check_pool = _split_pool(tgt.unlabelled_pool(), seed) if guarded else (tgt.unlabelled_pool(), None)

    def run(name: str, on_target_labels: bool = False) -> Specialist:
        log(f"-- {name}")
        pool = tgt.pool if on_target_labels else adapt_pool
        return fit(data, base=fresh_copy(loaded), method=name, target=pool, **common, **_options_for(name, options))

    done = dict(baselines or {})
    if "source-only" not in done:
        done["source-only"] = run("source-only")
    candidates = _candidates(method, loaded)
    for name in candidates:
        done[name] = run(name)
    verdict = None
    if guarded:
        verdict = _guard(done, ["source-only", *candidates], data, check_pool, loaded, seed, progress, log)
    shipped = verdict["shipped"] if verdict else (candidates[0] if candidates else "source-only")
    # A copy: the shipped model's manifest gets this run's report, and a baseline is reused by later runs.
    adapted = copy.copy(done[shipped])
    adapted.manifest = copy.deepcopy(adapted.manifest)
    if want_oracle and "target-oracle" not in done:
        done["target-oracle"] = run("target-oracle", on_target_labels=True)
    report = _report(method, shipped, adapted, candidates, done, tgt, want_oracle, progress)
    if verdict:
        report["guard"] = verdict
    report.update(base=loaded.info.name, source=data.source, target=tgt.source,
                  source_examples=len(data.split("train")), target_examples=len(tgt.pool),
                  wall_s=round(time.perf_counter() - t0, 3))
    _record(adapted, report, out)
    log(format_adapt_report(report))
    return AdaptResult(adapted, report, {k: v for k, v in done.items() if k in BASELINES})


def _record(adapted: Specialist, report: dict[str, Any], out: str | Path | None) -> None:
    """The report into the shipped model's manifest (target metrics first, the source's kept beside), saved."""
    adapted.manifest["adaptation"] = {k: v for k, v in report.items() if k != "target_metrics"}
    if report.get("target_metrics"):
        adapted.manifest["metrics"] = {**adapted.manifest["metrics"], **report["target_metrics"],
                                       "source_test": _headline(adapted.manifest["metrics"])}
    if out is not None:
        report["bundle"] = str(adapted.save(out))


def _candidates(method: str, loaded: "Backbone") -> list[str]:
    """The adaptation methods to fit: the one asked for, or for auto each one this base can run."""
    if method == "source-only":
        return []
    if method != "auto":
        return [method]
    from ..methods.adabn.method import bn_layers

    return [m for m in AUTO if m != "adabn" or bn_layers(loaded)]


def _split_pool(pool, seed: int) -> tuple[Any, Any]:
    """(what the methods adapt on, what the guard checks on): a seeded CHECK_SHARE of the target held back.

    The checks look at target inputs no method trained on: a model fitted to its own guesses on an input
    is sure of it, whatever it gets right (judged on its own training inputs, self-training's estimate rose
    95 points on a shift where it lost 1.4).
    """
    if len(pool) < 2:
        raise ConfigError(f"the guard checks on target examples no method trained on, and the target has "
                          f"{len(pool)}: give more target data, or guard=False (--no-guard) to ship the "
                          "method unchecked")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    held = max(1, round(CHECK_SHARE * len(order)))
    return pool.subset(sorted(order[held:])), pool.subset(sorted(order[:held]))


def _guard(done: dict[str, Specialist], names: list[str], data, pool, loaded: "Backbone", seed: int,
           progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The label-free checks of each model and the one to ship (experiments/adapt_checks.py)."""
    from ..core.metrics import class_shares
    from ..engine.features import cached_features
    from ..methods.base import loader_for
    from .adapt_checks import choose, target_checks

    held_out = data.split(data.eval_split)
    load = loader_for(data.kind)
    # The reverse check's yardstick: the untouched base's features (cached), the same for every model.
    base_held_out, _ = cached_features(loaded, held_out.items, load, 64, progress)
    base_target, _ = cached_features(loaded, pool.items, load, 64, progress)
    probs = {n: (done[n].predict_proba(pool.items, progress=progress),
                 done[n].predict_proba(held_out.items, progress=progress)) for n in names}
    shares = class_shares(data.split("train").labels, len(data.classes))
    checks = {n: target_checks(t, h, held_out.labels, probs["source-only"][0], base_target, base_held_out, shares,
                               seed) for n, (t, h) in probs.items()}
    shipped, why = choose(checks)
    log(f"guard: {why}")
    return {"shipped": shipped, "why": why, "checks": {n: c.to_json() for n, c in checks.items()},
            "held_out_source_examples": len(held_out), "checked_target_examples": len(pool)}


def _options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options this method's config has (baselines share the backbone mode and training options)."""
    known = {f.name for f in fields(get_method_spec(method).config_cls)}
    return {k: v for k, v in options.items() if k in known}


def _report(method: str, shipped: str, adapted: Specialist, candidates: list[str], done: dict[str, Specialist],
            tgt, want_oracle: bool, progress: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"method": method, "shipped": shipped,
                              "backbone": adapted.manifest["method"]["config"].get("backbone")}
    if tgt.test is None:
        report.update(source_only_accuracy=None, accuracy=None, oracle_accuracy=None, gap_closed=None,
                      note="no labelled target test data: pass target_test to measure the adaptation")
        return report
    # Each model once on the target test (never seen by the methods or the guard's checks).
    metrics = {name: done[name].evaluate(tgt.test, "test", progress=progress)
               for name in dict.fromkeys(["source-only", *candidates, shipped])}
    source_only = metrics["source-only"]["accuracy"]
    oracle = done["target-oracle"].evaluate(tgt.test, "test", progress=progress)["accuracy"] if want_oracle else None
    chosen = metrics[shipped]
    gap = None
    if oracle is not None and oracle - source_only > 1e-9:
        gap = (chosen["accuracy"] - source_only) / (oracle - source_only)
    report.update(source_only_accuracy=source_only, accuracy=chosen["accuracy"], macro_f1=chosen["macro_f1"],
                  oracle_accuracy=oracle, gap_closed=gap, test_examples=chosen["examples"],
                  candidate_accuracy={name: m["accuracy"] for name, m in metrics.items()},
                  target_metrics={**chosen, "split": "target test"})
    return report


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "examples", "split") if k in metrics}


def format_adapt_report(report: dict[str, Any]) -> str:
    """The table `headstart adapt` prints."""
    def pct(v):
        return "   -" if v is None else f"{v:.4f}"

    lines = [f"adaptation {report.get('source')} -> {report.get('target')} ({report['method']}, "
             f"backbone {report.get('backbone')}, base {report.get('base')})",
             f"  source-only  {pct(report.get('source_only_accuracy'))}",
             *[f"  {name:<12} {pct(acc)}" for name, acc in report.get("candidate_accuracy", {}).items()
               if name != "source-only"],
             *([] if report.get("candidate_accuracy") else [f"  {report['method']:<12} {pct(report.get('accuracy'))}"]),
             f"  oracle       {pct(report.get('oracle_accuracy'))}"]
    if report.get("guard"):
        lines.append(f"  shipped      {report['shipped']} ({pct(report.get('accuracy'))}): {report['guard']['why']}")
    if report.get("gap_closed") is not None:
        lines.append(f"  gap closed   {100 * report['gap_closed']:.1f}%")
    if report.get("note"):
        lines.append(f"  note: {report['note']}")
    return "\n".join(lines)
