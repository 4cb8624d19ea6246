"""The accuracy-vs-shots harness: every method x shot count x seed on the same sampled subsets.

    import headstart
    r = headstart.run_shots("../shared/data/trec", base="minilm-l6", methods=("zeroshot", "probe", "lora"),
                            shots=(0, 2, 8, 32), seeds=3, out="runs/trec-shots")
    print(headstart.shots.format_shots_table(r))   # rows: methods, columns: shots, cells: mean ± std

The dataset and the base are loaded once; each (shots, seed) subset is sampled once and handed to
every method, so differences between methods are never differences between samples. Every fit
evaluates on the full evaluation split (test, else val). Features are reused across runs through the
content-keyed feature cache, so frozen-base methods cost one extraction per distinct example.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import api
from ..bases.backbone import Backbone
from ..core.storage import atomic_write_text
from ..data import Dataset
from ..core.errors import ConfigError, HeadstartError
from ..methods.registry import get_method_spec, list_methods
from ..tasks import FitSettings
from ..tasks.classify import load_classification_data, prepare_base

DEFAULT_METHODS = ("zeroshot", "prototype", "probe", "setfit", "lora")
DEFAULT_SHOTS = (0, 2, 4, 8, 16, 32, 64)
EXAMPLE_FREE = {"zeroshot"}
"""Methods that never look at examples: run once, at 0 shots, and drawn as a flat line. (`auto` also has
`needs_examples = False` but uses examples when it has them, so it runs at every shot count.)"""


def run_shots(data: str | Path | Dataset, base: "str | Backbone | None" = None,
              methods: Sequence[str] = DEFAULT_METHODS, shots: Sequence[int] = DEFAULT_SHOTS,
              seeds: int | Sequence[int] = 5, *, out: str | Path | None = None, save_bundles: bool = False,
              method_options: dict[str, dict] | None = None, text_column: str = "text", label_column: str = "label",
              image_size: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Accuracy on the evaluation split for every method x shot count x seed; a dict, and files in `out`.

    `seeds=n` means seeds 0..n-1; a list picks them. `method_options` maps a method to its config
    options (`{"lora": {"epochs": 3}}`). A run failing with a HeadstartError (a method that does not
    support this base kind) is recorded with its error and the rest go on. With `out`: `shots.json`
    (rewritten after every run), `shots.md` (the table), `shots.png` (the plot); `save_bundles=True`
    also keeps each run's bundle in `out/bundles/<method>-<k>shot-seed<s>`.

    >>> r = run_shots("../shared/data/trec", base="minilm-l6", methods=["probe"], shots=[2, 8], seeds=2)
    >>> [(x["shots"], x["seeds"]) for x in r["results"]]
    [(2, 2), (8, 2)]
    """
    methods, shot_list, seed_list = _check_plan(methods, shots, seeds)
    method_options = method_options or {}
    if save_bundles and out is None:
        raise ConfigError("save_bundles needs an output folder (--out)")
    settings = FitSettings(seed=0, text_column=text_column, label_column=label_column)  # seed 0: one test split
    dataset = load_classification_data(data, settings)
    pristine, base_name = _load_pristine(base, dataset, image_size)
    plan = _plan(methods, shot_list, seed_list, log)

    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "dataset": dataset.source, "base": base_name, "eval_split": dataset.eval_split,
        "methods": methods, "shots": shot_list, "seeds": seed_list, "method_options": method_options,
        "complete": False, "results": [], "runs": [], "samples": {},
    }
    width = max(len(m) for m in methods)
    errors_logged: set[str] = set()
    t_start = time.perf_counter()
    for (k, s), runs in plan.items():
        subset = dataset.with_shots(k, s)  # built once: every method trains on exactly these examples
        result["samples"][f"{k}/{s}"] = _sample_hash(subset)
        for m in runs:
            run = _one_run(subset, pristine, base_name, isinstance(base, Backbone), m, k, s,
                           method_options.get(m, {}), out, save_bundles, image_size)
            result["runs"].append(run)
            result["results"] = aggregate(result["runs"], methods)
            if out is not None:
                _write(out, result)
            done, total = len(result["runs"]), sum(len(v) for v in plan.values())
            if "error" in run and m not in errors_logged:
                errors_logged.add(m)
                log(f"{m}: failed at {k} shots, seed {s}: {run['error']}")
            if progress:
                elapsed = time.perf_counter() - t_start
                what = f"acc {run['accuracy']:.3f}  train {run['train_s']:.1f} s" if "error" not in run else "failed"
                eta = f"  eta {_duration(elapsed / done * (total - done))}" if done < total else ""
                log(f"[{done:>{len(str(total))}}/{total}] {m:<{width}} {k:>3} shots  seed {s}  {what}{eta}")
    result["complete"] = True
    if out is not None:
        _write(out, result)
        if result["results"]:
            plot_accuracy_vs_shots(result, out / "shots.png")
    return result


def aggregate(runs: list[dict], methods: Sequence[str]) -> list[dict]:
    """Per (method, shots) over the successful runs: mean and sample std (ddof=1; 0 for one run)
    of accuracy, the number of runs, and the mean training seconds. Ordered by method, then shots."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault((r["method"], r["shots"]), []).append(r)
    order = {m: i for i, m in enumerate(methods)}
    rows = []
    for (m, k), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1])):
        accs = [r["accuracy"] for r in rs]
        rows.append({"method": m, "shots": k, "mean": round(statistics.fmean(accs), 4),
                     "std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0, "seeds": len(accs),
                     "train_s": round(statistics.fmean(r["train_s"] for r in rs), 3)})
    return rows


def format_shots_table(result: dict) -> str:
    """A Markdown table: one row per method, one column per shot count, cells `0.512 ± 0.031`.

    A blank cell was not run; `failed` means every run of that cell raised (see `runs` for why).
    """
    cells = {(r["method"], r["shots"]): f"{r['mean']:.3f} ± {r['std']:.3f}" for r in result["results"]}
    for r in result["runs"]:
        cells.setdefault((r["method"], r["shots"]), "failed")
    ran = {m for m, _ in cells}
    methods = [m for m in dict.fromkeys([*result.get("methods", []), *sorted(ran)]) if m in ran]
    shots = sorted({*result.get("shots", []), *(k for _, k in cells)})
    header = ["method", *(f"{k} shots" for k in shots)]
    rows = [[m, *(cells.get((m, k), "") for k in shots)] for m in methods]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    title = (f"Accuracy on the {result.get('eval_split', 'eval')} split of {result.get('dataset', '?')} "
             f"with {result.get('base', '?')} (mean ± std over seeds)")
    return "\n".join([title, "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])


def plot_accuracy_vs_shots(result: dict, path: str | Path) -> Path:
    """Accuracy vs shots, one line per method with a shaded ±std band; example-free methods are a
    dashed horizontal line. The x axis is symlog base 2, so 0 shots stays visible."""
    from matplotlib.figure import Figure  # lazy (~1 s); a bare Figure never touches the pyplot backend
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    shots = sorted({r["shots"] for r in result["results"]} | set(result.get("shots", [])))
    lo, hi = min(shots + [0]), max(shots + [1])
    by_method: dict[str, list[dict]] = {}
    for r in result["results"]:
        by_method.setdefault(r["method"], []).append(r)
    for i, (m, rows) in enumerate(by_method.items()):
        color = f"C{i % 10}"
        xs, ys, sd = [r["shots"] for r in rows], [r["mean"] for r in rows], [r["std"] for r in rows]
        if m in EXAMPLE_FREE:
            ax.axhline(ys[0], color=color, ls="--", label=f"{m} (no examples)")
            continue
        ax.plot(xs, ys, "o-", color=color, label=m)
        ax.fill_between(xs, [y - e for y, e in zip(ys, sd)], [y + e for y, e in zip(ys, sd)], color=color, alpha=0.2)
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlim(lo - 0.3 if lo == 0 else lo / 1.3, hi * 1.3)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.xaxis.set_minor_locator(NullLocator())  # symlog's minor ticks would suggest shot counts never run
    ax.set_xlabel("training examples per class (shots)")
    ax.set_ylabel(f"accuracy ({result.get('eval_split', 'eval')})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"accuracy vs shots: {Path(str(result.get('dataset', ''))).name} on {result.get('base', '')}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# ---- helpers ----------------------------------------------------------------------------------

def _check_plan(methods, shots, seeds) -> tuple[list[str], list[int], list[int]]:
    chosen_default = methods is DEFAULT_METHODS
    methods = list(dict.fromkeys(methods))
    if chosen_default:  # the standard line-up, less what this install does not register
        known = {spec.name for spec in list_methods()}
        methods = [m for m in methods if m in known]
    if not methods:
        raise ConfigError("no methods to run")
    for m in methods:
        get_method_spec(m)  # a typo fails now, not after an hour of other runs
    if isinstance(shots, (int, str)):
        raise ConfigError("shots must be a list of whole numbers, e.g. (0, 2, 8)")
    try:
        shot_list = sorted(set(int(k) for k in shots))
        seed_list = list(range(seeds)) if isinstance(seeds, int) else list(dict.fromkeys(int(s) for s in seeds))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"shots and seeds must be whole numbers ({e})") from None
    if not shot_list or shot_list[0] < 0:
        raise ConfigError(f"shots must be whole numbers >= 0, got {list(shots)}")
    if not seed_list:
        raise ConfigError(f"need at least one seed, got {seeds!r}")
    return methods, shot_list, seed_list


def _is_example_free(method: str) -> bool:
    return method in EXAMPLE_FREE and not get_method_spec(method).method_cls.needs_examples


def _plan(methods: list[str], shots: list[int], seeds: list[int], log) -> dict[tuple[int, int], list[str]]:
    """(shots, seed) -> the methods to run on that subset, in the order they will run."""
    plan: dict[tuple[int, int], list[str]] = {}
    for m in methods:
        if _is_example_free(m):
            plan.setdefault((0, seeds[0]), []).append(m)
            continue
        needs = get_method_spec(m).method_cls.needs_examples
        if 0 in shots and needs:
            log(f"note: {m} needs examples: it skips 0 shots")
        for k in shots:
            if k > 0 or not needs:
                for s in seeds:
                    plan.setdefault((k, s), []).append(m)
    return dict(sorted(plan.items()))


def _load_pristine(base, dataset: Dataset, image_size: int | None) -> tuple[Backbone, str]:
    """The base every run copies (a given Backbone is copied too: the caller's stays untouched), and its name."""
    pristine = prepare_base(copy.deepcopy(base) if isinstance(base, Backbone) else base, dataset,
                            image_size=image_size)
    return pristine, (base.info.name if isinstance(base, Backbone) else pristine.info.name)


def _one_run(subset: Dataset, pristine: Backbone, base_name: str, base_given: bool, method: str, k: int, s: int,
             options: dict, out: Path | None, save_bundles: bool, image_size: int | None) -> dict:
    run: dict[str, Any] = {"method": method, "shots": k, "seed": s}
    bundle = out / "bundles" / f"{method}-{k}shot-seed{s}" if save_bundles and out is not None else None
    fresh: dict[str, Any] = {}
    if get_method_spec(method).method_cls.needs_pretrained:
        backbone: Backbone | str = copy.deepcopy(pristine)  # trainable methods change the base in place
    elif base_given:
        run["error"] = f"{method} trains from random weights: pass the base by name, not as a loaded Backbone"
        return run
    else:  # e.g. `scratch`: fit loads the architecture with fresh random weights
        backbone, fresh = base_name, {"image_size": image_size}
    quiet: list[str] = []
    t0 = time.perf_counter()
    try:
        spec = api.fit(subset, base=backbone, method=method, seed=s, progress=False, out=bundle,
                       log=quiet.append, **fresh, **options)
    except HeadstartError as e:
        run["error"] = str(e)
        return run
    m = spec.manifest["metrics"]
    run.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"], train_s=m.get("train_s", 0.0),
               wall_s=round(time.perf_counter() - t0, 3))
    if bundle is not None:
        run["bundle"] = str(bundle)
    return run


def _sample_hash(subset: Dataset) -> str:
    """sha256 of the sampled training items and labels (image paths relative to the data folder)."""
    train = subset.split("train")
    root = str(subset.source).rstrip("/") + "/"
    items = [x[len(root):] if isinstance(x, str) and x.startswith(root) else str(x) for x in train.items]
    return hashlib.sha256(json.dumps([items, train.labels]).encode()).hexdigest()


def _write(out: Path, result: dict) -> None:
    atomic_write_text(out / "shots.json", json.dumps(result, indent=1, default=str) + "\n")
    atomic_write_text(out / "shots.md", format_shots_table(result) + "\n")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
