"""The specialists bench/serve.py serves, built once under its work folder (reused when present).

- `trec-00` .. `trec-NN`: minilm-l6 on disjoint slices of trec's training questions, even ones a probe
  (a head on the untouched base), odd ones LoRA r=8 (an adapter each: serving them switches adapters);
- `ants`: an efficientnet-lite0 probe on a few hymenoptera photos per class;
- `chat`: a small sft generator (smollm2-135m on the first alpaca rows; tiny-llm with --quick).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

QUIET = {"progress": False, "log": lambda _: None}


def _csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def text_specialists(data: Path, work: Path, count: int, per_slice: int, epochs: int, log) -> list[Path]:
    """`count` trec specialists, alternating probe and LoRA r=8, each on its own slice and seed."""
    import headstart

    train, test = read_rows(data / "trec" / "train.csv"), read_rows(data / "trec" / "test.csv")
    out = []
    for i in range(count):
        folder = work / "bundles" / f"trec-{i:02d}"
        out.append(folder)
        if (folder / "manifest.json").exists():
            continue
        slice_dir = work / "data" / folder.name
        _csv(slice_dir / "train.csv", train[i * per_slice:(i + 1) * per_slice])
        _csv(slice_dir / "test.csv", test[:60])
        method = "probe" if i % 2 == 0 else "lora"
        options = {"r": 8, "epochs": epochs} if method == "lora" else {}
        log(f"  fitting {folder.name} ({method}, {per_slice} questions)")
        headstart.fit(slice_dir, base="minilm-l6", method=method, seed=i, out=folder, **options, **QUIET)
    return out


def image_specialist(data: Path, work: Path, per_class: int, log) -> Path:
    """An efficientnet-lite0 probe on the first `per_class` training photos of each class."""
    import headstart

    folder = work / "bundles" / "ants"
    if (folder / "manifest.json").exists():
        return folder
    root = work / "data" / "hymenoptera"
    for split, n in (("train", per_class), ("val", 6)):
        for cls in ("ants", "bees"):
            target = root / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for photo in sorted((data / "hymenoptera" / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(photo, target / photo.name)
    log(f"  fitting ants (efficientnet-lite0 probe, {per_class} photos per class)")
    headstart.fit(root, base="efficientnet-lite0", method="probe", out=folder, **QUIET)
    return folder


def generator(data: Path, work: Path, quick: bool, log) -> Path:
    """A small sft LoRA generator: tiny-llm on 12 rows (--quick), smollm2-135m on 32 alpaca rows otherwise."""
    import headstart

    folder = work / "bundles" / "chat"
    if (folder / "manifest.json").exists():
        return folder
    rows = (data / "alpaca_en_demo" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:12 if quick else 32]
    train = work / "data" / "alpaca" / "train.jsonl"
    train.parent.mkdir(parents=True, exist_ok=True)
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    base = "tiny-llm" if quick else "smollm2-135m"
    log(f"  fitting chat ({base} sft LoRA, {len(rows)} rows, 1 epoch)")
    headstart.fit(train, base=base, method="lora", task="sft", eval=train, out=folder, epochs=1, batch_size=4,
                  max_length=64 if quick else 256, side_by_side=0, max_new_tokens=4, bf16="false", **QUIET)
    return folder


def chat_prompts(data: Path, n: int) -> list[str]:
    """Instructions from alpaca's test rows (what a chat would ask)."""
    rows = (data / "alpaca_en_demo" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(r)["instruction"] for r in rows[:max(n, 1)]]


def photos(data: Path, n: int) -> list[bytes]:
    """The raw bytes of `n` real validation photos (the request bodies of the image part)."""
    files = sorted((data / "hymenoptera" / "val").glob("*/*.jpg"))
    return [p.read_bytes() for p in files[:n]]
