"""Combine benchmark (issue 14): soups, merges with and without head refits, multi-task training, and
PEFT's `add_weighted_adapter` on the identical adapters. Federated learning: bench/combine_federated.py.

    .venv/bin/python bench/combine.py                      # everything (ingredients are trained first)
    .venv/bin/python bench/combine.py --stages soups       # one stage: soups, merges, multitask, peft
    .venv/bin/python bench/combine.py --seeds 2 --epochs 1 --work /tmp/cb-quick    # a quick look

Ingredients (bench/combine_data.py): lora r=8 on minilm-l6 (trec 5 seeds; sst2, emotion, subj capped per
class) and on efficientnet-lite0 (flowers17, 5 seeds), each dataset split once into train / val / test.
Every choice (greedy soups, head refit or not, `auto`) is made on val; every figure here is on test.
Prints markdown tables; writes bench/results/combine.json (one key per stage, merged into what is there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from combine_data import ingredients, log  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "combine.json"
MERGE_METHODS = [("linear", {}), ("task_arithmetic", {"scale": 0.3}), ("task_arithmetic", {"scale": 0.5}),
                 ("ties", {"density": 0.2}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5}),
                 ("dare_ties", {"density": 0.2}), ("auto", {})]
DARE_SEEDS = 3
QUIET = {"log": lambda s: None}


def soups(found: dict, results: dict, sets: list[str]) -> None:
    import headstart

    rows = results.get("soups", {})
    for name in sets:
        bundles = found[name]
        t0 = time.perf_counter()
        uni = headstart.merge(bundles, method="soup", **QUIET)
        greedy = headstart.merge(bundles, method="soup", greedy_on="val", **QUIET)
        rows[name] = {"ingredients": [r["eval"]["accuracy"] for r in uni["ingredients"]],
                      "best": uni["best_ingredient"], "mean": uni["mean_ingredient"],
                      "uniform": uni["accuracy"], "uniform_old_head": uni["accuracy_kept_heads"],
                      "greedy": greedy["accuracy"], "greedy_members": sum(1 for w in greedy["recipe"]["weights"] if w),
                      "batchnorm": uni.get("batchnorm"), "seconds": round(time.perf_counter() - t0, 1)}
        log(f"soups {name}: {rows[name]}")
    results["soups"] = rows
    print("\n### Soups (test accuracy; 5 lora runs each)\n")
    print("| data | best run | mean run | uniform soup | greedy soup (runs kept) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['best']:.4f} | {r['mean']:.4f} | {r['uniform']:.4f} | {r['greedy']:.4f} "
              f"({r['greedy_members']}) |")


def merges(found: dict, results: dict) -> None:
    import headstart

    rows = []
    for method, kw in MERGE_METHODS:
        seeds = range(DARE_SEEDS) if method.startswith("dare") else [0]
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            r = headstart.merge(found["tasks"], method=method, seed=seed, **kw, **QUIET)
            runs.append(_merge_row(r, time.perf_counter() - t0))
        row = {"method": method, **kw, "label": runs[0]["label"], **_mean_rows(runs), "seeds": len(runs)}
        rows.append(row)
        log(f"merge {row['label']}: normalized old heads {row['normalized_kept']:.3f}, refit {row['normalized_refit']:.3f}")
    results["merges"] = rows
    print("\n### Four tasks in one (minilm-l6 lora: sst2, trec, emotion, subj; normalized = merged / alone)\n")
    print("| merge | mean acc, old heads | normalized | mean acc, heads refit | normalized | kept per val |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['acc_kept']:.4f} | {r['normalized_kept']:.3f}{_pm(r, 'normalized_kept')} | "
              f"{r['acc_refit']:.4f} | {r['normalized_refit']:.3f}{_pm(r, 'normalized_refit')} | "
              f"{r['normalized_chosen']:.3f} |")


def _merge_row(r: dict, seconds: float) -> dict:
    tasks = r["tasks"].values()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"label": r["recipe"]["label"], "acc_kept": mean([t["kept"]["accuracy"] for t in tasks]),
            "acc_refit": mean([t["refit"]["accuracy"] for t in tasks]),
            "normalized_kept": mean([t["kept"]["accuracy"] / t["alone"] for t in tasks]),
            "normalized_refit": mean([t["refit"]["accuracy"] / t["alone"] for t in tasks]),
            "normalized_chosen": r["normalized"], "per_task": {k: {"kept": v["kept"]["accuracy"],
                                                                   "refit": v["refit"]["accuracy"],
                                                                   "alone": v["alone"]} for k, v in r["tasks"].items()},
            "seconds": round(seconds, 1)}


def _mean_rows(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("acc_kept", "acc_refit", "normalized_kept", "normalized_refit", "normalized_chosen", "seconds"):
        vals = [r[key] for r in runs]
        out[key] = statistics.mean(vals)
        if len(vals) > 1:
            out[key + "_std"] = statistics.stdev(vals)
    return out


def _pm(row: dict, key: str) -> str:
    return f" ± {row[key + '_std']:.3f}" if key + "_std" in row else ""


def multitask(found: dict, results: dict, work: Path, epochs: int) -> None:
    import headstart

    names = ["sst2", "trec", "emotion", "subj"]
    alone = {n: json.loads((b / "manifest.json").read_text())["metrics"]["accuracy"]
             for n, b in zip(names, found["tasks"])}
    out = work / "runs" / "multitask"
    t0 = time.perf_counter()
    if not (out / "manifest.json").exists():
        headstart.fit(tasks={n: str(work / "data" / n) for n in names}, base="minilm-l6", method="lora", r=8,
                      alpha=16, epochs=epochs, out=str(out), progress=False, log=lambda s: None)
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    per = {n: m["tasks"][n]["accuracy"] for n in names}
    results["multitask"] = {"per_task": per, "alone": alone, "normalized": sum(per[n] / alone[n] for n in names) / 4,
                            "mean": sum(per.values()) / 4,
                            "seconds": m.get("wall_s", round(time.perf_counter() - t0, 1))}
    print("\n### Multi-task training (one lora adapter, a head per task) vs one specialist per task\n")
    print("| task | alone | multi-task |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {alone[n]:.4f} | {per[n]:.4f} |")
    print(f"| normalized | 1.000 | {results['multitask']['normalized']:.3f} |")


def peft_comparison(found: dict, results: dict) -> None:
    """PEFT's add_weighted_adapter on the same four adapters, scored through the same heads and refits."""
    from peft_merge import peft_merges

    rows = peft_merges(found["tasks"])
    results["peft"] = rows
    print("\n### PEFT add_weighted_adapter on the identical adapters (normalized, old heads / refit)\n")
    print("| PEFT combination | normalized, old heads | normalized, heads refit |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['normalized_kept']:.3f} | {r['normalized_refit']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/combine-bench")
    p.add_argument("--stages", default="soups,merges,peft,multitask")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--flowers-epochs", type=int, default=3)
    p.add_argument("--soup-sets", default="trec,flowers17", help="which soups the soups stage makes")
    a = p.parse_args()
    work = Path(a.work)
    stages = a.stages.split(",")
    sets = a.soup_sets.split(",")
    which = tuple(sets) * ("soups" in stages) + ("tasks",) * bool({"merges", "peft", "multitask"} & set(stages))
    found = ingredients(work, a.seeds, a.epochs, a.flowers_epochs, which)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["settings"] = {"seeds": a.seeds, "epochs": a.epochs, "flowers_epochs": a.flowers_epochs,
                           "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    for stage in stages:
        {"soups": lambda: soups(found, results, sets), "merges": lambda: merges(found, results),
         "peft": lambda: peft_comparison(found, results),
         "multitask": lambda: multitask(found, results, work, a.epochs)}[stage]()
        RESULTS.parent.mkdir(exist_ok=True)
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=float))
        os.replace(tmp, RESULTS)


if __name__ == "__main__":
    main()
