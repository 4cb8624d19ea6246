"""The probe floor (issue 17): headstart's `probe` head vs a plain scikit-learn LogisticRegression on the
same frozen features, on every classification dataset in ../shared/data it runs on.

    .venv/bin/python bench/probe_floor.py                       # every dataset (~15 min cold on 2 cores)
    .venv/bin/python bench/probe_floor.py --datasets cr,trec

Features come from the feature cache (`cached_features`, as `fit --method probe` uses them): minilm-l6
for text, efficientnet-lite0 (224 px, its own preprocessing) for images; whole train splits, scored on
the dataset's evaluation split (test, else val). The head is headstart's own (`fit_head_with_l2_search`,
the function the probe method calls), so the figures are the method's. sklearn's reference is
`LogisticRegression()` with its defaults (C=1, lbfgs) except `max_iter=5000` so it converges: the floor.
A gap comes with its paired exact McNemar p (the rows only one of the two gets right): is it more than the
evaluation split's noise? Prints a table and writes bench/results/probe_floor.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import headstart  # noqa: E402
from headstart.engine.features import cached_features  # noqa: E402
from headstart.methods.base import loader_for  # noqa: E402
from headstart.methods.heads import L2_GRID  # noqa: E402
from headstart.methods.probe.method import fit_head_with_l2_search  # noqa: E402

DATA = Path(os.environ.get("HEADSTART_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"
TEXT = ("ag_news", "banking77", "clinc150", "cr", "emotion", "mpqa", "mr", "sms_spam", "sst2", "sst5", "subj", "trec")
IMAGES = ("caltech101_subset20", "flowers17", "hymenoptera")
BASE = {"text": "minilm-l6", "image": "efficientnet-lite0"}


def features(name: str) -> tuple[dict, str]:
    data = headstart.load_dataset(DATA / name)
    base = headstart.load_base(BASE[data.kind])
    out = {}
    for split in ("train", data.eval_split):
        part = data.split(split)
        x, _ = cached_features(base, part.items, loader_for(data.kind), 64, progress=False)
        out[split] = (x, np.asarray(part.labels))
    return {"train": out["train"], "eval": out[data.eval_split], "classes": len(data.classes)}, data.eval_split


def sklearn_floor(f: dict) -> np.ndarray:
    """Which evaluation rows sklearn's LogisticRegression() gets right."""
    from sklearn.linear_model import LogisticRegression

    (x, y), (xe, ye) = f["train"], f["eval"]
    model = LogisticRegression(max_iter=5000)
    model.fit(x.double().numpy(), y)
    return model.predict(xe.double().numpy()) == ye


def headstart_probe(f: dict) -> tuple[np.ndarray, float]:
    """Which evaluation rows the probe's head gets right, and the L2 strength it chose."""
    (x, y), (xe, ye) = f["train"], f["eval"]
    w, b, l2, _ = fit_head_with_l2_search(x, y.tolist(), f["classes"], list(L2_GRID))
    return (xe @ w.T + b).argmax(-1).numpy() == ye, l2


def mcnemar_p(ours: np.ndarray, floor: np.ndarray) -> float:
    """Exact two-sided McNemar test on the rows where exactly one of the two is right: is the gap more
    than the test split's sampling noise? (Both heads score the same rows, so the test is paired.)"""
    from scipy.stats import binomtest

    only_ours, only_floor = int((ours & ~floor).sum()), int((floor & ~ours).sum())
    return 1.0 if only_ours + only_floor == 0 else binomtest(only_ours, only_ours + only_floor).pvalue


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(TEXT + IMAGES))
    args = p.parse_args()
    rows = []
    for name in args.datasets.split(","):
        t0 = time.perf_counter()
        f, split = features(name)
        feat_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_right, l2 = headstart_probe(f)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        floor_right = sklearn_floor(f)
        floor_s = time.perf_counter() - t0
        ours, floor = float(ours_right.mean()), float(floor_right.mean())
        row = {"dataset": name, "base": BASE["image" if name in IMAGES else "text"], "split": split,
               "train": len(f["train"][1]), "classes": f["classes"], "headstart_probe": round(ours, 4), "l2": l2,
               "sklearn_default": round(floor, 4), "gap": round(ours - floor, 4),
               "rows_gap": int(ours_right.sum() - floor_right.sum()),
               "mcnemar_p": round(mcnemar_p(ours_right, floor_right), 4), "headstart_s": round(ours_s, 1),
               "sklearn_s": round(floor_s, 1), "features_s": round(feat_s, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("\n| dataset | base | train | classes | headstart probe | sklearn LogisticRegression() | gap (rows) | "
          "McNemar p | l2 |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flag = "" if r["gap"] >= 0 else " (below)"
        print(f"| {r['dataset']} | {r['base']} | {r['train']} | {r['classes']} | {r['headstart_probe']:.3f} | "
              f"{r['sklearn_default']:.3f} | {r['gap']:+.3f} ({r['rows_gap']:+d}){flag} | {r['mcnemar_p']:.2f} | {r['l2']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "probe_floor.json"
    out.with_suffix(".tmp").write_text(json.dumps({"run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                   "rows": rows}, indent=1))
    os.replace(out.with_suffix(".tmp"), out)


if __name__ == "__main__":
    main()
