"""Task proximity benchmark: do LogME / NCE / LEEP / H-score / kNN rank candidates as fine-tuning does?

    python bench/rank.py                                  # 5 datasets, probe on every layer + lora per base
    python bench/rank.py --datasets trec --no-lora        # quick

For each dataset (images: hymenoptera, flowers17 with efficientnet-lite0/1/2; text: trec, sst5, emotion
with minilm-l6 and smollm2-135m) and each candidate (base x layer, `rank --layers all`):
  * the scores, from `headstart.rank` on the training split (capped at --max-train, class-stratified;
    the same rows every method trains on), timed cold (features extracted, in a fresh cache that shares
    only the unpacked bases) and warm (cached);
  * actual accuracy on the test split of a `probe` on that layer's features (every candidate), and of
    `lora` fine-tuning (the candidates LoRA can train: each base's final layer).
Then Kendall's tau and weighted tau (scipy's hyperbolic weighting, as TLlib reports) between each score
and actual accuracy, per dataset and on average; the regret of each score's first pick (best accuracy
minus the picked candidate's); and the time ratio (LoRA fine-tuning of the base candidates) / (ranking
every candidate, cold), overall and per candidate. Targets from the issue: LogME tau >= 0.6; ratio >= 100x.
Prints tables and writes bench/results/rank.json (rewritten after every dataset).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from scipy.stats import kendalltau, weightedtau  # noqa: E402

import headstart  # noqa: E402
from headstart.engine.features import cached_layer_features  # noqa: E402
from headstart.methods.base import loader_for  # noqa: E402
from headstart.methods.probe.method import fit_head_with_l2_search  # noqa: E402
from headstart.transfer.rank import _stratified  # noqa: E402

DATA = REPO.parent / "shared" / "data"
IMAGE_BASES = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
TEXT_BASES = ["minilm-l6", "smollm2-135m"]
DATASETS = {"hymenoptera": IMAGE_BASES, "flowers17": IMAGE_BASES, "trec": TEXT_BASES, "sst5": TEXT_BASES,
            "emotion": TEXT_BASES}
SCORES = ["logme", "nce", "leep", "hscore", "knn"]
L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def capped(name: str, max_train: int, max_test: int):
    data = headstart.load_dataset(DATA / name, seed=0)
    test_name = data.eval_split
    splits = {"train": _stratified(data.split("train"), max_train, 0), test_name: _stratified(data.split(test_name),
                                                                                             max_test, 0)}
    return dataclasses.replace(data, splits=splits), test_name


def probe_accuracy(xtr, ytr, xte, yte, num_classes: int) -> float:
    w, b, _, _ = fit_head_with_l2_search(xtr, ytr, num_classes, L2_GRID, None, 200, 0)
    return ((xte @ w.T.to(xte.dtype) + b.to(xte.dtype)).argmax(1) == torch.tensor(yte)).float().mean().item()


def taus(rows: list[dict], accuracy_key: str) -> dict[str, dict[str, float | None]]:
    out = {}
    for score in SCORES:
        pairs = [(r[score], r[accuracy_key]) for r in rows if r.get(score) is not None and r.get(accuracy_key) is not None]
        if len(pairs) < 2:
            out[score] = {"tau": None, "weighted_tau": None, "n": len(pairs)}
            continue
        s, a = zip(*pairs)
        tau = kendalltau(s, a).statistic
        wtau = weightedtau(s, a).statistic
        out[score] = {"tau": None if tau != tau else round(float(tau), 4),
                      "weighted_tau": None if wtau != wtau else round(float(wtau), 4), "n": len(pairs)}
    return out


def fresh_cache() -> Path:
    """A new, empty $HEADSTART_CACHE for one dataset, sharing only the unpacked bases and their file hashes.

    So "cold" really extracts features, and no LoRA run resumes from an earlier run's checkpoint.
    """
    real = Path(os.environ.get("HEADSTART_CACHE", Path.home() / ".cache" / "headstart")).expanduser()
    tmp = Path(tempfile.mkdtemp(prefix="headstart-rank-bench-"))
    for shared in ("bases", "hashes"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (tmp / shared).symlink_to(real / shared, target_is_directory=True)
    return tmp


def regrets(rows: list[dict], accuracy_key: str) -> dict[str, float | None]:
    """Per score: best accuracy minus the accuracy of the candidate that score ranks first (0 = picked the best)."""
    scored = [r for r in rows if r.get(accuracy_key) is not None]
    if not scored:
        return {}
    best = max(r[accuracy_key] for r in scored)
    out = {}
    for score in SCORES:
        pool = [r for r in scored if r.get(score) is not None]
        out[score] = round(best - max(pool, key=lambda r: r[score])[accuracy_key], 4) if pool else None
    return out


def run_dataset(name: str, bases: list[str], args) -> dict:
    real_cache = os.environ.get("HEADSTART_CACHE")
    os.environ["HEADSTART_CACHE"] = str(fresh_cache())
    try:
        return _run_dataset(name, bases, args)
    finally:
        shutil.rmtree(os.environ["HEADSTART_CACHE"])  # removes the links, not the shared folders
        if real_cache is None:
            del os.environ["HEADSTART_CACHE"]
        else:
            os.environ["HEADSTART_CACHE"] = real_cache


def _run_dataset(name: str, bases: list[str], args) -> dict:
    data, test_name = capped(name, args.max_train, args.max_test)
    train, test = data.split("train"), data.split(test_name)
    print(f"== {name}: {len(train)} train / {len(test)} {test_name}, {len(data.classes)} classes", flush=True)
    t = time.perf_counter()
    ranking = headstart.rank(data, bases=bases, layers="all", progress=False, log=lambda s: None)
    rank_cold_s = time.perf_counter() - t
    t = time.perf_counter()
    headstart.rank(data, bases=bases, layers="all", progress=False, log=lambda s: None)
    rank_warm_s = time.perf_counter() - t
    rows = [c.to_json() for c in ranking.candidates]
    probe_s = 0.0
    for base in bases:
        backbone = headstart.load_base(base)
        layers = [r["layer"] for r in rows if r["base"] == base]
        load = loader_for(backbone.kind)
        xtr, _ = cached_layer_features(backbone, train.items, load, layers, progress=False)
        xte, _ = cached_layer_features(backbone, test.items, load, layers, progress=False)
        for r in rows:
            if r["base"] == base:
                t = time.perf_counter()
                r["probe_accuracy"] = probe_accuracy(xtr[r["layer"]], train.labels, xte[r["layer"]], test.labels,
                                                     len(data.classes))
                probe_s += time.perf_counter() - t
        del backbone
    lora_s = 0.0
    if not args.no_lora:
        for base in bases:
            t = time.perf_counter()
            spec = headstart.fit(data, base=base, method="lora", seed=0, progress=False, log=lambda s: None,
                                 **({"epochs": args.lora_epochs} if args.lora_epochs else {}))
            seconds = time.perf_counter() - t
            lora_s += seconds
            row = next(r for r in rows if r["base"] == base and r["layer"] == "final")
            row["lora_accuracy"], row["lora_s"] = spec.manifest["metrics"]["accuracy"], round(seconds, 1)
            print(f"  lora {base}: {row['lora_accuracy']:.3f} in {seconds:.0f} s", flush=True)
    result = {"train": len(train), "test": len(test), "test_split": test_name, "classes": len(data.classes),
              "candidates": rows, "rank_cold_s": round(rank_cold_s, 2), "rank_warm_s": round(rank_warm_s, 3),
              "probe_fit_s": round(probe_s, 1), "lora_s": round(lora_s, 1),
              "tau_probe": taus(rows, "probe_accuracy"),
              "tau_lora": taus(rows, "lora_accuracy") if not args.no_lora else None,
              "regret_probe": regrets(rows, "probe_accuracy"),
              "regret_lora": regrets(rows, "lora_accuracy") if not args.no_lora else None,
              "time_ratio_lora": round(lora_s / rank_cold_s, 1) if lora_s else None,
              # fine-tuning cost per fine-tuned candidate / ranking cost per ranked candidate
              "time_ratio_lora_per_candidate": round((lora_s / len(bases)) / (rank_cold_s / len(rows)), 1)
              if lora_s else None}
    print(table(name, result), flush=True)
    return result


def table(name: str, r: dict) -> str:
    lines = [f"{name}: rank {r['rank_cold_s']:.1f} s cold / {r['rank_warm_s']:.2f} s warm; lora {r['lora_s']:.0f} s; "
             f"ratio {r['time_ratio_lora']} ({r['time_ratio_lora_per_candidate']} per candidate)",
             "| base | layer | logme | nce | leep | hscore | knn | probe acc | lora acc |", "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(r["candidates"], key=lambda c: -c["logme"]):
        cells = [f"{c[s]:.3f}" if c[s] is not None else "-" for s in SCORES]
        lora = f"{c['lora_accuracy']:.3f}" if c.get("lora_accuracy") is not None else ""
        lines.append(f"| {c['base']} | {c['layer']} | " + " | ".join(cells) + f" | {c['probe_accuracy']:.3f} | {lora} |")
    for key in ("regret_probe", "regret_lora"):
        if r.get(key):
            lines.append(f"{key}: " + ", ".join(f"{s} {v}" for s, v in r[key].items()))
    for key in ("tau_probe", "tau_lora"):
        if r.get(key):
            lines.append(f"{key}: " + ", ".join(f"{s} {v['tau']}/{v['weighted_tau']} (n={v['n']})"
                                                for s, v in r[key].items()))
    return "\n".join(lines)


def summary(results: dict) -> dict:
    out = {}
    for key in ("tau_probe", "tau_lora"):
        per_score = {}
        for score in SCORES:
            vals = [r[key][score] for r in results.values() if r.get(key) and r[key][score]["tau"] is not None]
            if vals:
                per_score[score] = {"mean_tau": round(statistics.mean(v["tau"] for v in vals), 4),
                                    "mean_weighted_tau": round(statistics.mean(v["weighted_tau"] for v in vals), 4),
                                    "datasets": len(vals)}
        out[key] = per_score
    for key in ("regret_probe", "regret_lora"):
        per_score = {}
        for score in SCORES:
            vals = [r[key][score] for r in results.values() if r.get(key) and r[key].get(score) is not None]
            if vals:
                per_score[score] = {"mean_regret": round(statistics.mean(vals), 4),
                                    "picked_best": sum(v == 0 for v in vals), "datasets": len(vals)}
        out[key] = per_score
    per_candidate = [r["time_ratio_lora_per_candidate"] for r in results.values()
                     if r.get("time_ratio_lora_per_candidate")]
    if per_candidate:
        out["time_ratio_lora_per_candidate_median"] = statistics.median(per_candidate)
    ratios = [r["time_ratio_lora"] for r in results.values() if r.get("time_ratio_lora")]
    if ratios:
        out["time_ratio_lora_median"] = statistics.median(ratios)
        out["time_ratio_lora_total"] = round(sum(r["lora_s"] for r in results.values()) /
                                             sum(r["rank_cold_s"] for r in results.values() if r.get("lora_s")), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--max-train", type=int, default=2000, help="class-stratified cap on training rows")
    p.add_argument("--max-test", type=int, default=1000, help="class-stratified cap on test rows")
    p.add_argument("--no-lora", action="store_true", help="probe accuracy only (minutes instead of an hour)")
    p.add_argument("--lora-epochs", type=int, default=None, help="default: the lora method's own")
    args = p.parse_args()
    out_path = REPO / "bench" / "results" / "rank.json"
    results: dict = {}
    for name in args.datasets.split(","):
        results[name] = run_dataset(name, DATASETS[name], args)
        doc = {"settings": {**vars(args), "date": time.strftime("%Y-%m-%d")}, "datasets": results,
               "summary": summary(results)}
        out_path.write_text(json.dumps(doc, indent=2))
    print(json.dumps(summary(results), indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
