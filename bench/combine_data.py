"""The data and the ingredient specialists of the combine benchmark (bench/combine.py).

Every merge, soup and multi-task run is compared on the same held-out sets, so each dataset gets one
seeded split of its training data into `train` and `val` (val: what greedy soups, `--method auto` and
early stopping choose on; never the test split). The splits are written as small folders under the work
directory (tables, or symlinks to the image files): nothing is copied into the repository.

Ingredients are ordinary `headstart.fit` runs (lora, the same rank and targets everywhere, so their
adapters merge); each is skipped when its bundle already exists, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import csv
import os
import random
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TEXT = {  # name -> (folder, the file(s) training examples come from, val source, per-class cap or None)
    "trec": ("trec", "train.csv", None, None),
    "sst2": ("sst2", "train.csv", "dev.csv", 1000),
    "emotion": ("emotion", "train.csv", "dev.csv", 500),
    "subj": ("subj", "train.csv", None, 1000),
}
VAL_SHARE = 0.1
LORA = {"r": 8, "alpha": 16}
"""Every ingredient's adapter shape: merges need one rank and one set of target modules."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    os.replace(tmp, path)


def _cap(rows: list[dict], per_class: int | None, rng: random.Random) -> list[dict]:
    if per_class is None:
        return rows
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    out = []
    for label in sorted(by):
        group = by[label][:]
        rng.shuffle(group)
        out += group[:per_class]
    rng.shuffle(out)
    return out


def text_task(name: str, work: Path, seed: int = 0) -> Path:
    """`work/data/<name>/{train,val,test}.csv`: a capped train, a fixed val, the real test split."""
    folder, train_file, val_file, cap = TEXT[name]
    out = work / "data" / name
    if (out / "test.csv").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = _read(DATA / folder / train_file)
    rng.shuffle(rows)
    if val_file is None:
        n_val = min(1000, int(len(rows) * VAL_SHARE))
        val, rows = rows[:n_val], rows[n_val:]
    else:
        val = _read(DATA / folder / val_file)[:1000]
    _write(out / "train.csv", _cap(rows, cap, rng))
    _write(out / "val.csv", val)
    _write(out / "test.csv", _read(DATA / folder / "test.csv"))
    return out


def image_task(name: str, work: Path, seed: int = 0) -> Path:
    """`work/data/<name>/{train,val,test}/<class>/*`: symlinks; val = 10% of each class's training images."""
    out = work / "data" / name
    if (out / "test").exists():
        return out
    rng = random.Random(seed)
    tmp = out.with_name(out.name + ".tmp")
    for split in ("train", "test"):
        for cls in sorted(p.name for p in (DATA / name / split).iterdir() if p.is_dir()):
            files = sorted((DATA / name / split / cls).iterdir())
            if split == "train":
                rng.shuffle(files)
                n_val = max(1, round(len(files) * VAL_SHARE))
                parts = {"val": files[:n_val], "train": files[n_val:]}
            else:
                parts = {"test": files}
            for part, chosen in parts.items():
                (tmp / part / cls).mkdir(parents=True, exist_ok=True)
                for f in chosen:
                    (tmp / part / cls / f.name).symlink_to(f)
    tmp.rename(out)
    return out


def fit_once(data: Path, out: Path, base: str, seed: int, **options) -> Path:
    """One lora ingredient (skipped when its bundle exists)."""
    if (out / "manifest.json").exists():
        return out
    import headstart

    t0 = time.perf_counter()
    headstart.fit(str(data), base=base, method="lora", seed=seed, out=str(out), progress=False,
                  log=lambda s: None, **LORA, **options)
    log(f"fit {out.name} in {time.perf_counter() - t0:.0f} s")
    return out


def ingredients(work: Path, seeds: int, epochs: int, flowers_epochs: int,
                which: tuple[str, ...] = ("trec", "tasks", "flowers17")) -> dict[str, list[Path]]:
    """The specialists the stages combine: `trec-s{i}` / `flowers17-s{i}` soups, one per text task (`tasks`:
    sst2, trec, emotion, subj; trec's is `trec-s0`). Only the groups in `which` are trained."""
    runs = work / "runs"
    found: dict[str, list[Path]] = {}
    if "trec" in which or "tasks" in which:
        found["trec"] = [fit_once(text_task("trec", work), runs / f"trec-s{s}", "minilm-l6", s, epochs=epochs)
                         for s in range(seeds if "trec" in which else 1)]
    if "tasks" in which:
        found["tasks"] = [fit_once(text_task(name, work), runs / f"{name}-s0", "minilm-l6", 0, epochs=epochs)
                          for name in ("sst2", "emotion", "subj")]
        found["tasks"].insert(1, found["trec"][0])
    if "flowers17" in which:
        flowers = image_task("flowers17", work)
        found["flowers17"] = [fit_once(flowers, runs / f"flowers17-s{s}", "efficientnet-lite0", s,
                                       epochs=flowers_epochs) for s in range(seeds)]
    return found


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="train the combine benchmark's ingredients (resumable)")
    p.add_argument("--work", default="runs/combine-bench")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--flowers-epochs", type=int, default=3)
    a = p.parse_args()
    ingredients(Path(a.work), a.seeds, a.epochs, a.flowers_epochs)
