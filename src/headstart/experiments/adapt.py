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
"""
from __future__ import annotations

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
ADAPTIVE = ("adabn", "coral", "dann", "selftrain", "source-only")
"""What `adapt` runs as its method: the adaptation methods, and the source-only baseline alone."""


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
          baselines: dict[str, Specialist] | None = None, **options: Any) -> AdaptResult:
    """Adapt a specialist trained on labelled `source` data to the unlabelled `target` domain.

    `target_test`: labelled target data to measure on (default: the target's own held-out split).
    `target_unlabelled`: the target may have no labels at all (no oracle, and no target accuracy
    without `target_test`). Target labels never reach the adaptation method.
    `oracle`: train the target-oracle reference (default: whenever the target has labels).
    `options`: the method's config fields, e.g. `backbone="lora", epochs=3`; the baselines get the
    ones their config shares (backbone mode, epochs, lr ...), so all three train alike.
    `baselines`: specialists from an earlier run with the same source/target/options, reused.

    >>> run = adapt("books_train.csv", "kitchen_train.csv", target_test="kitchen_test.csv", method="coral")
    >>> sorted(k for k in run.report if k.endswith("accuracy"))
    ['accuracy', 'oracle_accuracy', 'source_only_accuracy']
    """
    t0 = time.perf_counter()
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

    def run(name: str, on_target_labels: bool = False) -> Specialist:
        log(f"-- {name}")
        pool = tgt.pool if on_target_labels else tgt.unlabelled_pool()
        return fit(data, base=fresh_copy(loaded), method=name, target=pool, **common, **_options_for(name, options))

    done = dict(baselines or {})
    if "source-only" not in done:
        done["source-only"] = run("source-only")
    adapted = done["source-only"] if method == "source-only" else run(method)
    if want_oracle and "target-oracle" not in done:
        done["target-oracle"] = run("target-oracle", on_target_labels=True)
    report = _report(method, adapted, done, tgt, want_oracle, progress)
    report.update(base=loaded.info.name, source=data.source, target=tgt.source,
                  source_examples=len(data.split("train")), target_examples=len(tgt.pool),
                  wall_s=round(time.perf_counter() - t0, 3))
    adapted.manifest["adaptation"] = {k: v for k, v in report.items() if k != "target_metrics"}
    if report.get("target_metrics"):
        adapted.manifest["metrics"] = {**adapted.manifest["metrics"], **report["target_metrics"],
                                       "source_test": _headline(adapted.manifest["metrics"])}
    if out is not None:
        report["bundle"] = str(adapted.save(out))
    log(format_adapt_report(report))
    return AdaptResult(adapted, report, {k: v for k, v in done.items() if k in BASELINES})


def _options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options this method's config has (baselines share the backbone mode and training options)."""
    known = {f.name for f in fields(get_method_spec(method).config_cls)}
    return {k: v for k, v in options.items() if k in known}


def _report(method: str, adapted: Specialist, done: dict[str, Specialist], tgt, want_oracle: bool,
            progress: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"method": method, "backbone": adapted.manifest["method"]["config"].get("backbone")}
    if tgt.test is None:
        report.update(source_only_accuracy=None, accuracy=None, oracle_accuracy=None, gap_closed=None,
                      note="no labelled target test data: pass target_test to measure the adaptation")
        return report
    metrics = adapted.evaluate(tgt.test, "test", progress=progress)
    source_only = done["source-only"].evaluate(tgt.test, "test", progress=progress)["accuracy"]
    oracle = done["target-oracle"].evaluate(tgt.test, "test", progress=progress)["accuracy"] if want_oracle else None
    gap = None
    if oracle is not None and oracle - source_only > 1e-9:
        gap = (metrics["accuracy"] - source_only) / (oracle - source_only)
    report.update(source_only_accuracy=source_only, accuracy=metrics["accuracy"], macro_f1=metrics["macro_f1"],
                  oracle_accuracy=oracle, gap_closed=gap, test_examples=metrics["examples"],
                  target_metrics={**metrics, "split": "target test"})
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
             f"  {report['method']:<12} {pct(report.get('accuracy'))}",
             f"  oracle       {pct(report.get('oracle_accuracy'))}"]
    if report.get("gap_closed") is not None:
        lines.append(f"  gap closed   {100 * report['gap_closed']:.1f}%")
    if report.get("note"):
        lines.append(f"  note: {report['note']}")
    return "\n".join(lines)
