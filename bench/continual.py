"""Continual-update benchmark (issue 13): fit on night 1, `headstart.update` every later night, per strategy.

    .venv/bin/python bench/continual.py --stream banking --method probe --seeds 0,1,2
    .venv/bin/python bench/continual.py --stream amazon --method lora --strategies naive,ewc,replay+lwf,joint
    .venv/bin/python bench/continual.py --stream llm --method lora --quick        # SFT: held-out loss matrix
    .venv/bin/python bench/continual.py --stream caltech --method probe --quick   # 1 seed, small test sets

Streams (bench/continual_streams.py): amazon (domain), banking (class), flowers (drift), caltech (class), llm
(generative). Each strategy updates its own copy of the night-1 bundle with `max_forgetting=None` (the guard
measures, never rejects: a strategy comparison, not the product default). After night i every night's test
set j is scored (class-incremental: j <= i, later classes are unknown) into R[i][j]; metrics per
bench/continual_metrics.py (ACC, BWT, forgetting: GEM / Chaudhry et al.), mean ± std over seeds. Bounds:
`joint` (retrain on everything: upper) and `frozen` (the night-1 model never updated: lower; 0 on classes it
never saw). Also the update wall time and the lineage folder's size after each version.
Prints markdown tables; writes bench/results/continual_<stream>_<method>[_quick].json. Progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import continual_metrics as cm  # noqa: E402
from continual_streams import STREAMS, build_stream  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("naive", "l2sp", "ewc", "replay", "lwf", "replay+lwf", "joint", "auto")
BOUNDS = ("joint", "frozen")
# Targets of the issue: max forgetting in points by scenario.
FORGETTING_TARGET = {"domain": 2.0, "class": 5.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of a folder, hard links counted once (a lineage hard-links unchanged files)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def score(folder: Path, tests: list[Path | None], generative: bool) -> list[float | None]:
    """One row of R: the current version of `folder` on each test set (None: not measured)."""
    import headstart

    spec = headstart.load(folder)
    key = "loss" if generative else "accuracy"
    return [None if t is None else float(headstart.evaluate(spec, t)[key]) for t in tests]


def tests_after(stream, i: int) -> list[Path | None]:
    """Test sets to score after night i: all of them, or (class-incremental) those of nights <= i."""
    return [n.test if stream.scenario != "class" or j <= i else None for j, n in enumerate(stream.nights)]


def fit_night1(stream, method: str, out: Path, seed: int, headstart_log, quick: bool = False) -> tuple[Path, float]:
    import headstart

    # sft: no base-vs-tuned sample report (generation on a CPU costs minutes and is not measured here)
    options = {"task": "sft", "eval": str(stream.nights[0].test), "side_by_side": 0} if stream.kind == "sft" else {}
    if quick and stream.kind == "sft":
        options["epochs"] = 1  # a smoke run of the generative path, not a figure
    t0 = time.perf_counter()
    headstart.fit(str(stream.fit_data()), base=stream.base, method=method, out=out, seed=seed, progress=False,
                  log=headstart_log, **options)
    return out, time.perf_counter() - t0


def frozen_matrix(stream, row0: list[float | None]) -> list[list[float | None]]:
    """The night-1 model never updated: row 0 repeated; a class it never saw scores 0 (it cannot name it)."""
    n = len(stream.nights)
    if stream.scenario == "class":
        return [[row0[0] if j == 0 else (0.0 if j <= i else None) for j in range(n)] for i in range(n)]
    return [list(row0) for _ in range(n)]


def _update(folder: Path, data: Path, strategy: str, seed: int, headstart_log, unlabelled: bool = False) -> dict:
    import headstart

    t0 = time.perf_counter()
    report = headstart.update(folder, data, strategy=strategy, max_forgetting=None, unlabelled=unlabelled,
                              seed=seed, progress=False, log=headstart_log)
    return {"accepted": report.get("accepted"), "version": report.get("version"), "strategy": report.get("strategy"),
            "scenario": report.get("scenario"), "why": report.get("why"), "examples": report.get("examples"),
            "wall_s": round(time.perf_counter() - t0, 2), "update_wall_s": report.get("wall_s"),
            "guards": report.get("guards")}


def run_strategy(stream, strategy: str, night1: Path, work: Path, row0: list, seed: int, headstart_log,
                 use_unlabelled: bool = True) -> dict:
    """Copy the night-1 bundle, update it night after night with `strategy`, score R after each night.
    A night with unlabelled photos (flowers) gets a second, `unlabelled=True` update after the labelled one."""
    folder = work / strategy.replace("+", "_")
    shutil.copytree(night1, folder, symlinks=True)
    R, updates = [list(row0)], [{"night": stream.nights[0].name, "version": 1, "bundle_bytes": folder_bytes(folder)}]
    for i, night in enumerate(stream.nights[1:], 1):
        entry = {"night": night.name, **_update(folder, night.train, strategy, seed, headstart_log)}
        wall = entry["wall_s"]
        if use_unlabelled and night.unlabelled is not None:
            try:
                entry["unlabelled"] = _update(folder, night.unlabelled, strategy, seed, headstart_log, unlabelled=True)
            except Exception as e:  # noqa: BLE001 -- kept in the JSON; the labelled figures still count
                entry["unlabelled"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  {strategy} night {i + 1} unlabelled update FAILED: {type(e).__name__}: {e}")
        updates.append({**entry, "bundle_bytes": folder_bytes(folder)})
        R.append(score(folder, tests_after(stream, i), stream.kind == "sft"))
        extra = f" + unlabelled {entry['unlabelled'].get('wall_s')} s" if "unlabelled" in entry else ""
        log(f"  {strategy} night {i + 1} ({night.name}): {wall:.1f} s{extra}, v{entry['version']}, "
            f"accepted={entry['accepted']}, row {_fmt_row(R[-1])}")
    shutil.rmtree(folder, ignore_errors=True)  # the figures are kept; the bundles are not
    return {"R": R, "updates": updates}


def summarise(stream, R: list) -> dict:
    if stream.kind == "sft":
        return cm.loss_summary(R)
    return cm.summarise(R, [n.test_size for n in stream.nights] if stream.scenario == "class" else None)


def warm_feature_cache(stream) -> float:
    """Extract every night's frozen-base features once, before any timed update: otherwise the first
    strategy of a probe run pays for the extraction and the others read the cache (not comparable)."""
    import headstart
    from continual_avalanche import stream_features
    from headstart.engine.features import cached_features
    from headstart.methods.base import loader_for

    t0 = time.perf_counter()
    stream_features(stream, log=lambda s: None)
    loose = [n.unlabelled for n in stream.nights if n.unlabelled is not None]
    if loose:  # the unlabelled nights' photos, listed as `update --unlabelled` lists them
        backbone = headstart.load_base(stream.base)
        items = [str(f) for folder in loose for f in sorted(folder.rglob("*")) if f.is_file()]
        cached_features(backbone, items, loader_for(backbone.kind), progress=False)
    return time.perf_counter() - t0


def run_seed(stream, method: str, strategies: list[str], work: Path, seed: int, headstart_log,
             use_unlabelled: bool = True) -> dict:
    """Every strategy on one seed's stream; {name: run} including `frozen`."""
    if method == "probe":
        log(f"seed {seed}: frozen-base features of every night extracted in {warm_feature_cache(stream):.1f} s "
            "(cached before the timed updates)")
    night1, fit_s = fit_night1(stream, method, work / "night1", seed, headstart_log, quick=stream.settings["quick"])
    row0 = score(night1, tests_after(stream, 0), stream.kind == "sft")
    log(f"seed {seed}: night 1 fitted in {fit_s:.1f} s; row {_fmt_row(row0)}")
    runs = {"frozen": {"R": frozen_matrix(stream, row0), "updates": [], "fit_s": round(fit_s, 2)}}
    for strategy in strategies:
        try:
            runs[strategy] = run_strategy(stream, strategy, night1, work, row0, seed, headstart_log, use_unlabelled)
        except Exception as e:  # one strategy failing (a HeadstartError, or a bug) must not lose the others
            log(f"  {strategy} FAILED: {type(e).__name__}: {e}")
            runs[strategy] = {"error": f"{type(e).__name__}: {e}"}
    for run in runs.values():
        if "R" in run:
            run["summary"] = summarise(stream, run["R"])
            run["seed"] = seed
    return runs


def aggregate(stream, per_seed: list[dict]) -> dict:
    """{strategy: {runs, aggregate (mean/std over seeds), mean_R, wall_s, bundle_mb}}."""
    out = {}
    for name in per_seed[0]:
        runs = [s[name] for s in per_seed if name in s]
        good = [r for r in runs if "summary" in r]
        entry = {"runs": runs, "errors": [r["error"] for r in runs if "error" in r]}
        if good:
            entry["aggregate"] = cm.aggregate([r["summary"] for r in good])
            entry["mean_R"] = cm.mean_matrix([r["R"] for r in good])
            walls = [u["wall_s"] for r in good for u in r["updates"] if "wall_s" in u]
            entry["update_wall_s"] = cm.mean_std(walls) if walls else None
            sizes = [[u["bundle_bytes"] for u in r["updates"]] for r in good if r["updates"]]
            entry["bundle_mb_per_version"] = ([round(sum(s[k] for s in sizes) / len(sizes) / 2**20, 2)
                                               for k in range(len(sizes[0]))] if sizes else None)
        out[name] = entry
    return out


def targets(stream, results: dict) -> dict:
    """The issue's targets, measured: best strategy's ACC vs joint's, max forgetting vs the scenario's bar."""
    if stream.kind == "sft" or "joint" not in results or "aggregate" not in results["joint"]:
        return {}
    contenders = {k: v["aggregate"] for k, v in results.items() if k not in BOUNDS and "aggregate" in v}
    if not contenders:
        return {}
    best = max(contenders, key=lambda k: contenders[k]["acc"]["mean"])
    joint_acc = results["joint"]["aggregate"]["acc"]["mean"]
    bar = FORGETTING_TARGET.get(stream.scenario)
    best_forgetting = round(100 * contenders[best]["max_forgetting"]["mean"], 2)
    return {"best": best, "best_acc": contenders[best]["acc"]["mean"], "joint_acc": joint_acc,
            "best_over_joint": round(contenders[best]["acc"]["mean"] / joint_acc, 4) if joint_acc else None,
            "acc_target_met": contenders[best]["acc"]["mean"] >= 0.95 * joint_acc,
            "forgetting_bar_pts": bar, "best_max_forgetting_pts": best_forgetting,
            "forgetting_target_met": bar is not None and best_forgetting <= bar}


def format_tables(report: dict) -> str:
    head = (f"## {report['stream']} ({report['scenario']}, {report['base']}, {report['method']}, "
            f"{len(report['seeds'])} seed(s))")
    if report["kind"] == "sft":
        lines = [head, "", "| strategy | final loss | max loss rise | BWT (loss) | wall s / update | MB last version |",
                 "|---|---|---|---|---|---|"]
        cols = ("final_loss", "max_loss_rise", "bwt_loss")
        fmt = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    else:
        lines = [head, "", "| strategy | ACC % | BWT pts | max forgetting pts | wall s / update | MB last version |",
                 "|---|---|---|---|---|---|"]
        cols = ("acc", "bwt", "max_forgetting")
        if report["scenario"] == "class":  # accuracy on the union of the seen classes' test rows, last night
            lines[2], lines[3] = lines[2] + " all seen classes % |", lines[3] + "---|"
        fmt = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    for name, entry in report["results"].items():
        if "aggregate" not in entry:
            lines.append(f"| {name} | failed: {entry['errors'][0][:80]} | | | | |")
            continue
        agg = entry["aggregate"]
        wall = entry.get("update_wall_s")
        mb = (entry.get("bundle_mb_per_version") or [None])[-1]
        wall_text = "-" if not wall else f"{wall['mean']:.1f}"
        seen = f" {100 * agg['seen_accuracy'][-1]:.1f} |" if "seen_accuracy" in agg else ""
        lines.append(f"| {name} | " + " | ".join(fmt(agg[c]) for c in cols)
                     + f" | {wall_text} | {'-' if mb is None else mb} |{seen}")
    lines += ["", "Mean R (rows: after night i; columns: night j's test set):", ""]
    nights = report["nights"]
    lines += ["| strategy | after | " + " | ".join(nights) + " |", "|---|---|" + "---|" * len(nights)]
    for name, entry in report["results"].items():
        for i, row in enumerate(entry.get("mean_R") or []):
            cells = " | ".join(_cell(v, report["kind"]) for v in row)
            lines.append(f"| {name if i == 0 else ''} | {nights[i]} | {cells} |")
    if report.get("targets"):
        t = report["targets"]
        lines += ["", f"Targets: best = {t['best']}, ACC {100 * t['best_acc']:.1f}% = "
                      f"{t['best_over_joint']:.3f} x joint "
                      f"({'met' if t['acc_target_met'] else 'NOT met'}: >= 0.95); max forgetting "
                      f"{t['best_max_forgetting_pts']} pts ({'met' if t['forgetting_target_met'] else 'NOT met'}: "
                      f"<= {t['forgetting_bar_pts']})"]
    return "\n".join(lines)


def _cell(v, kind: str) -> str:
    return "" if v is None else (f"{v:.3f}" if kind == "sft" else f"{100 * v:.1f}")


def _fmt_row(row: list) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.3f}" for v in row) + "]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", choices=STREAMS, required=True)
    p.add_argument("--method", default=None, help="probe | lora | finetune (default: probe; llm: lora)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="one seed (the first), small test sets: a smoke run")
    p.add_argument("--verbose", action="store_true", help="forward headstart's own log lines to stderr")
    p.add_argument("--no-unlabelled", action="store_true", help="flowers: skip the nights' unlabelled updates")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/continual_<stream>_<method>.json)")
    args = p.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}: choose from {', '.join(STRATEGIES)}")
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    args.method = args.method or ("lora" if args.stream == "llm" else "probe")
    headstart_log = (lambda s: log(f"  | {s}")) if args.verbose else (lambda s: None)
    per_seed, stream = [], None
    with tempfile.TemporaryDirectory(prefix=f"hs-continual-{args.stream}-") as tmp:
        for seed in seeds:
            stream = build_stream(args.stream, Path(tmp) / "data", seed=seed, quick=args.quick)
            log(f"seed {seed}: {args.stream} stream, nights "
                + ", ".join(f"{n.name} ({n.train_size} train, {n.test_size} test)" for n in stream.nights))
            per_seed.append(run_seed(stream, args.method, strategies, Path(tmp) / f"runs-seed{seed}", seed,
                                     headstart_log, not args.no_unlabelled))
    results = aggregate(stream, per_seed)
    report = {"stream": stream.name, "scenario": stream.scenario, "kind": stream.kind, "base": stream.base,
              "method": args.method, "seeds": seeds, "quick": args.quick, "stream_settings": stream.settings,
              "nights": [n.name for n in stream.nights], "max_forgetting": None,
              "unlabelled_updates": not args.no_unlabelled and any(n.unlabelled for n in stream.nights),
              "metric": "held-out loss (lower is better)" if stream.kind == "sft" else "accuracy",
              "results": results, "targets": targets(stream, results)}
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else RESULTS / f"continual_{stream.name}_{args.method}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(format_tables(report), flush=True)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
