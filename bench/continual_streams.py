"""The nightly streams of issue 13's benchmark, written as files under a temp folder (never in the repo).

Each stream is a list of nights; night k is a folder holding what `headstart.fit` (night 1) or
`headstart.update` (later nights) receives, plus the test set that the R matrix column k is measured on:

    text:   night<k>/train.csv, night<k>/test.csv                     (text,label)
    images: night<k>/train/<class>/*, night<k>/test/<class>/*         (symlinks to /work/shared/data, or
                                                                       corrupted copies for the drift stream)
    sft:    night<k>/train.jsonl, night<k>/test.jsonl                 (alpaca {instruction, input, output})

Night 1's folder is a whole dataset (train + test splits) so `fit` trains on all of night 1's rows and
reports on its test split; `update` gets `night.train` only. Every choice (which rows, which class
goes to which night) is seeded, so a seed names the same stream for headstart and for Avalanche.

>>> stream = build_stream("banking", Path("/tmp/x"), seed=0, quick=True)
>>> stream.scenario, len(stream.nights), stream.nights[0].labels[:2]
('class', 5, [...])
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(os.environ.get("HEADSTART_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STREAMS = ("amazon", "banking", "flowers", "caltech", "llm")
AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")
# Flowers drift: night 1 clean, then blur/dark/noise/JPEG growing (headstart.data.corrupt's knobs).
FLOWERS_DRIFT = (None, {"blur": 1.0, "dark": 0.25, "noise": 0.03, "jpeg": 60},
                 {"blur": 2.0, "dark": 0.45, "noise": 0.06, "jpeg": 40},
                 {"blur": 3.0, "dark": 0.65, "noise": 0.10, "jpeg": 25})
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass
class Night:
    """One night of a stream: `train` goes to fit/update, `test` is its column of the R matrix."""

    name: str
    folder: Path
    train: Path
    test: Path
    labels: list[str]
    train_size: int
    test_size: int
    unlabelled: Path | None = None  # loose images without labels (flowers: the rest of the night's photos)
    unlabelled_size: int = 0


@dataclass
class Stream:
    name: str
    kind: str  # text | image | sft
    scenario: str  # domain | class | generative
    base: str
    nights: list[Night]
    settings: dict = field(default_factory=dict)  # how it was built, for the JSON report

    def fit_data(self) -> Path:
        """What `headstart.fit` gets on night 1: the whole night-1 dataset (sft: its train file)."""
        return self.nights[0].train if self.kind == "sft" else self.nights[0].folder


def build_stream(name: str, root: Path, seed: int = 0, quick: bool = False) -> Stream:
    """Write stream `name` for `seed` under `root` (created) and describe it."""
    builders = {"amazon": amazon_stream, "banking": banking_stream, "flowers": flowers_stream,
                "caltech": caltech_stream, "llm": llm_stream}
    if name not in builders:
        raise ValueError(f"unknown stream {name!r}: choose from {', '.join(STREAMS)}")
    root = Path(root) / f"{name}-seed{seed}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    stream = builders[name](root, seed, quick)
    stream.settings.update(seed=seed, quick=quick)
    return stream


# ---- text ---------------------------------------------------------------------------------------

def _read_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f) if r["text"].strip()]


def _write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def _sample(rows: list, n: int | None, rng: random.Random) -> list:
    return list(rows) if n is None or n >= len(rows) else rng.sample(rows, n)


def _text_night(root: Path, k: int, name: str, train: list, test: list) -> Night:
    folder = root / f"night{k}"
    _write_rows(folder / "train.csv", train)
    _write_rows(folder / "test.csv", test)
    labels = sorted({y for _, y in train})
    return Night(name, folder, folder / "train.csv", folder / "test.csv", labels, len(train), len(test))


def amazon_stream(root: Path, seed: int, quick: bool, per_night: int = 200, test_cap: int = 400) -> Stream:
    """Domain-incremental sentiment: books -> dvd -> electronics -> kitchen, `per_night` labelled reviews a
    night (seeded sample of the domain's train split), tested on the domain's test split (capped)."""
    rng = random.Random(seed)
    test_cap = 100 if quick else test_cap
    nights = []
    for k, domain in enumerate(AMAZON_DOMAINS, 1):
        train = _sample(_read_rows(DATA / "amazon_multidomain" / f"{domain}_train.csv"), per_night, rng)
        test = _sample(_read_rows(DATA / "amazon_multidomain" / f"{domain}_test.csv"), test_cap, random.Random(k))
        nights.append(_text_night(root, k, domain, train, test))
    return Stream("amazon", "text", "domain", "minilm-l6", nights,
                  {"per_night": per_night, "test_cap": test_cap, "domains": list(AMAZON_DOMAINS)})


def class_groups(classes: list[str], nights: int, seed: int) -> list[list[str]]:
    """A seeded class order cut into `nights` near-equal groups (the first groups take the remainder)."""
    order = sorted(classes)
    random.Random(seed).shuffle(order)
    size, extra = divmod(len(order), nights)
    groups, start = [], 0
    for k in range(nights):
        end = start + size + (1 if k < extra else 0)
        groups.append(sorted(order[start:end]))
        start = end
    return groups


def banking_stream(root: Path, seed: int, quick: bool, nights: int = 5, per_class: int = 20,
                   test_per_class: int | None = None) -> Stream:
    """Class-incremental intents: banking77's 77 intents in 5 nights (16,16,15,15,15 new intents),
    `per_class` training rows per new intent; night k's test = the test rows of its own intents."""
    rng = random.Random(seed)
    test_per_class = 8 if quick else test_per_class
    by_label_train, by_label_test = defaultdict(list), defaultdict(list)
    for text, label in _read_rows(DATA / "banking77" / "train.csv"):
        by_label_train[label].append((text, label))
    for text, label in _read_rows(DATA / "banking77" / "test.csv"):
        by_label_test[label].append((text, label))
    out = []
    for k, group in enumerate(class_groups(list(by_label_train), nights, seed), 1):
        train = [row for c in group for row in _sample(by_label_train[c], per_class, rng)]
        test = [row for c in group for row in _sample(by_label_test[c], test_per_class, random.Random(k))]
        rng.shuffle(train)
        out.append(_text_night(root, k, f"intents{k}", train, test))
    return Stream("banking", "text", "class", "minilm-l6", out,
                  {"nights": nights, "per_class": per_class, "test_per_class": test_per_class or "all"})


# ---- images -------------------------------------------------------------------------------------

def _images(folder: Path) -> dict[str, list[Path]]:
    return {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for c in sorted(folder.iterdir()) if c.is_dir()}


def _link_split(target: Path, files: dict[str, list[Path]], flat: bool = False) -> int:
    """target/<class>/<file> symlinks (the data is read-only and never copied); `flat`: target/<n>.jpg,
    loose images whose path does not name their class (an unlabelled night)."""
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    for label, paths in files.items():
        if not flat:
            (target / label).mkdir(parents=True, exist_ok=True)
        for p in paths:
            (target / f"{n:05d}{p.suffix.lower()}" if flat else target / label / p.name).symlink_to(p)
            n += 1
    return n


def _image_night(root: Path, k: int, name: str, train: dict, test: dict, corruption: dict | None,
                 seed: int, unlabelled: dict | None = None) -> Night:
    folder = root / f"night{k}"
    links = folder if corruption is None else root / f".clean{k}"
    n_train, n_test = _link_split(links / "train", train), _link_split(links / "test", test)
    n_unlabelled = _link_split(links / "unlabelled", unlabelled, flat=True) if unlabelled else 0
    if corruption is not None:
        from headstart.data.corrupt import corrupt_folder

        # Corrupt the linked mirror, then keep only its folders (CORRUPTION.json stays beside them).
        stage = root / f".corrupt{k}"
        corrupt_folder(links, stage, seed=seed, progress=False, log=lambda s: None, **corruption)
        folder.mkdir(parents=True)
        for part in ("train", "test", "unlabelled")[: 3 if unlabelled else 2]:
            (stage / part).rename(folder / part)
        shutil.rmtree(links)
    return Night(name, folder, folder / "train", folder / "test", sorted(train), n_train, n_test,
                 folder / "unlabelled" if unlabelled else None, n_unlabelled)


def flowers_stream(root: Path, seed: int, quick: bool, per_class: int = 8) -> Stream:
    """Domain drift: flowers17, 4 nights of `per_class` labelled photos per class (disjoint rows), night 1
    clean and nights 2-4 increasingly blurred/darkened/noised; night k's test = the test split corrupted
    the same way (quick: 6 test photos per class). Nights 2-4 also carry the rest of the training photos
    (their share of the 64 - 4 x 8 per class; quick: 2 per class) corrupted alike, without labels."""
    rng = random.Random(seed)
    train_all, test_all = _images(DATA / "flowers17" / "train"), _images(DATA / "flowers17" / "test")
    shuffled = {c: rng.sample(v, len(v)) for c, v in train_all.items()}
    test = {c: v[:6] for c, v in test_all.items()} if quick else test_all
    nights = []
    for k, corruption in enumerate(FLOWERS_DRIFT, 1):
        train = {c: v[(k - 1) * per_class: k * per_class] for c, v in shuffled.items()}
        unlabelled = None
        if k > 1:  # the photos no night labels, shared out between nights 2..4 (disjoint)
            rest = {c: v[len(FLOWERS_DRIFT) * per_class:] for c, v in shuffled.items()}
            share = 2 if quick else min(len(v) for v in rest.values()) // (len(FLOWERS_DRIFT) - 1)
            unlabelled = {c: v[(k - 2) * share: (k - 1) * share] for c, v in rest.items()}
        nights.append(_image_night(root, k, "clean" if corruption is None else f"drift{k - 1}", train, test,
                                   corruption, seed, unlabelled))
    return Stream("flowers", "image", "domain", "efficientnet-lite0", nights,
                  {"per_class": per_class, "drift": list(FLOWERS_DRIFT), "test_per_class": 6 if quick else "all"})


def caltech_stream(root: Path, seed: int, quick: bool, nights: int = 4, per_class: int | None = None) -> Stream:
    """Class-incremental objects: caltech101_subset20's 20 classes in 4 nights of 5 new classes, every
    training photo of the new classes (quick: 10 per class); night k's test = its classes' test photos."""
    rng = random.Random(seed)
    per_class = 10 if quick and per_class is None else per_class
    train_all = _images(DATA / "caltech101_subset20" / "train")
    test_all = _images(DATA / "caltech101_subset20" / "test")
    out = []
    for k, group in enumerate(class_groups(list(train_all), nights, seed), 1):
        train = {c: _sample(train_all[c], per_class, rng) for c in group}
        test = {c: test_all[c][:8] if quick else test_all[c] for c in group}
        out.append(_image_night(root, k, f"objects{k}", train, test, None, seed))
    return Stream("caltech", "image", "class", "efficientnet-lite0", out,
                  {"nights": nights, "per_class": per_class or "all", "test_per_class": 8 if quick else "all"})


# ---- instructions -------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


TREC_NAMES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
              "LOC": "location", "NUM": "number"}


def trec_instructions(rows: list[tuple[str, str]]) -> list[dict]:
    """TREC questions as alpaca rows: the answer is the coarse question type, in words."""
    return [{"instruction": "What kind of answer does this question ask for? Answer with one word: "
                            "abbreviation, description, entity, human, location or number.",
             "input": text, "output": TREC_NAMES.get(label, label.lower())} for text, label in rows]


def llm_stream(root: Path, seed: int, quick: bool, night2_rows: int = 200) -> Stream:
    """Generative: night 1 = a seeded half of alpaca_en_demo's train split (quick: 16 rows), tested on its
    test split (quick: 10); night 2 = TREC questions as instructions (quick: 32), tested on 100 TREC test
    rows (quick: 10)."""
    rng = random.Random(seed)
    alpaca = _read_jsonl(DATA / "alpaca_en_demo" / "train.jsonl")
    alpaca_train = _sample(alpaca, 16 if quick else len(alpaca) // 2, rng)
    alpaca_test = _read_jsonl(DATA / "alpaca_en_demo" / "test.jsonl")[: 10 if quick else None]
    trec_train = trec_instructions(_sample(_read_rows(DATA / "trec" / "train.csv"), 32 if quick else night2_rows, rng))
    trec_test = trec_instructions(_read_rows(DATA / "trec" / "test.csv")[: 10 if quick else 100])
    nights = []
    for k, (name, train, test) in enumerate((("alpaca", alpaca_train, alpaca_test),
                                             ("trec-instructions", trec_train, trec_test)), 1):
        folder = root / f"night{k}"
        nights.append(Night(name, folder, _write_jsonl(folder / "train.jsonl", train),
                            _write_jsonl(folder / "test.jsonl", test), [], len(train), len(test)))
    return Stream("llm", "sft", "generative", "smollm2-135m", nights,
                  {"alpaca_rows": len(alpaca_train), "trec_rows": len(trec_train)})
