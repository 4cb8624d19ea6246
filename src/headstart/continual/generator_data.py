"""A generator's nights: instruction rows (JSONL) keyed by content, and the way back from what the memory
kept (refs, raw) to rows a model can read.

An example is one instruction row (a JSON object in one of the SFT shapes). Its key is the sha256 of its
canonical JSON (`json.dumps(row, sort_keys=True)`), so the journal knows a row learned before whatever
file it sits in now. Store `refs` keeps (file, key) and re-reads the file, matching keys; store `raw`
keeps the canonical JSON itself (opted in).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import DataError
from .memory import GUARD_CAP, ExampleSet, Memory, NightRecord

ROW_LABEL = "row"
"""The one 'class' of every generator example: the reservoir is then a plain uniform reservoir."""
REPLAY_SIZE = 1000
MIN_GUARD_NIGHT = 10
"""A night smaller than this holds nothing back (a guard of one or two rows measures noise)."""


def canonical(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


def row_key(row: dict) -> str:
    """sha256 of the row's canonical JSON: what the journal and the refs store compare."""
    return hashlib.sha256(canonical(row).encode("utf-8")).hexdigest()


def read_rows(path: Path) -> tuple[list[dict], int]:
    """(usable instruction rows of a JSONL / JSON-list file, in file order; rows skipped). Usable = what
    `llm.data.load_sft_examples` accepts, so a fit's held-out split falls on the same rows."""
    from ..llm.data import load_sft_rows

    try:
        rows, skipped = load_sft_rows(path)
    except DataError as e:
        raise DataError(f"{e} (a generator's nights are instruction rows; preference pairs are not learned by "
                        "update)") from None
    return rows, len(skipped)


def chat_messages(rows: list[dict]) -> list[list[dict[str, str]]]:
    from ..llm.data import sft_messages

    return [sft_messages(r) for r in rows]


@dataclass
class InstructionNight:
    rows: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """The resolved file each row came from: what store `refs` keeps."""
    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    already_learned: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> dict[str, Any]:
        return {"files": self.files, "examples": len(self), "labelled": False, "labels": {},
                "skipped": self.skipped, "already_learned": self.already_learned}

    def split_guard(self, share: float, seed: int) -> tuple[list[int], list[int]]:
        """(training indices, held-back guard indices): a seeded `share`, at most GUARD_CAP."""
        n = len(self)
        if n < MIN_GUARD_NIGHT or share <= 0:
            return list(range(n)), []
        order = list(range(n))
        random.Random(f"{seed}:guard").shuffle(order)
        held = set(order[:min(GUARD_CAP, max(1, round(n * share)))])
        return [i for i in range(n) if i not in held], sorted(held)

    def as_examples(self, idx: list[int], store: str) -> ExampleSet:
        keys = [self.keys[i] for i in idx]
        labels = [ROW_LABEL] * len(idx)
        if store == "refs":
            return ExampleSet(labels, keys, refs=[self.sources[i] for i in idx])
        if store == "raw":
            return ExampleSet(labels, keys, raw=[canonical(self.rows[i]) for i in idx])
        return ExampleSet(labels, keys)


def read_instruction_night(paths: list[Path], learned: Callable[[str], bool]) -> InstructionNight:
    """The new rows of `paths` (files, or folders of .jsonl/.json files), minus those learned before."""
    from .night import _content_sha256

    night = InstructionNight()
    for path in paths:
        if not path.exists():
            raise DataError(f"no such file or folder: {path}")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".jsonl", ".json")) if path.is_dir() else [path]
        for f in files:
            rows, skipped = read_rows(f)
            fresh = 0
            for row in rows:
                key = row_key(row)
                if learned(key) or key in night.keys:
                    night.already_learned += 1
                    continue
                fresh += 1
                night.rows.append(row)
                night.keys.append(key)
                night.sources.append(str(f.resolve()))
            night.skipped += skipped
            night.files.append({"name": f.name, "sha256": _content_sha256(f), "examples": len(rows), "new": fresh})
    return night


def resolve_rows(examples: ExampleSet) -> tuple[list[dict], int]:
    """(rows, dropped) from what store `raw` or `refs` kept; a row whose file is gone or no longer holds
    it (its key) is dropped and counted."""
    if examples.raw is not None:
        return [json.loads(s) for s in examples.raw], 0
    if examples.refs is None:
        return [], len(examples)
    by_file: dict[str, dict[str, dict]] = {}
    rows, dropped = [], 0
    for ref, key in zip(examples.refs, examples.keys):
        if ref not in by_file:
            try:
                by_file[ref] = {row_key(r): r for r in read_rows(Path(ref))[0]}
            except DataError:
                by_file[ref] = {}
        row = by_file[ref].get(key)
        if row is None:
            dropped += 1
        else:
            rows.append(row)
    return rows, dropped


def convert_store(examples: ExampleSet, store: str) -> ExampleSet:
    """Examples kept under another store: `raw` reads the rows back and keeps them; `refs` from raw cannot
    say where a row lives, and `none` keeps nothing: both drop what raw held (the user asked for less)."""
    if store == "raw" and examples.raw is None:
        rows, _ = resolve_rows(examples)
        return ExampleSet([ROW_LABEL] * len(rows), [row_key(r) for r in rows], raw=[canonical(r) for r in rows])
    if store == "refs" and examples.refs is not None:
        return ExampleSet(list(examples.labels), list(examples.keys), refs=list(examples.refs))
    return ExampleSet() if store != "raw" else examples


def stored(rows: list[dict], source: Path, store: str) -> ExampleSet:
    night = InstructionNight(rows, [row_key(r) for r in rows], [str(source.resolve())] * len(rows))
    return night.as_examples(list(range(len(rows))), store)


def seed_generator_memory(spec, store: str, opts, version: int) -> Memory:
    """Night 1's memory for a fit-made sft bundle: its held-out rows as the guard set (never trained on)
    and a reservoir of its training rows, when the data the manifest records is still here."""
    from ..llm.data import split_holdout
    from .update import seeded_rng

    memory = Memory(store, kind="instruction", replay_size=REPLAY_SIZE)
    facts = spec.manifest.get("data", {})
    source = facts.get("source")
    if spec.manifest.get("task") != "sft":
        opts.log(f"update: a {spec.manifest.get('task')} bundle's data is not instruction rows: night 1 has no "
                 "guard set and nothing to replay")
        return memory
    if store == "none" or not source or not Path(source).is_file():
        opts.log(f"update: the data version {version} was fitted on ({source or 'unknown'}) is not here: "
                 "its night has no guard set and nothing to replay")
        return memory
    try:
        rows, _ = read_rows(Path(source))
        eval_file = Path(facts.get("eval", "")) if facts.get("eval") else None
        if eval_file is not None and eval_file.is_file():  # fit(eval=FILE): held out in a file of its own
            train, held, held_path = rows, read_rows(eval_file)[0], eval_file
        else:  # the fit's own seeded split (same rows, same order, same seed and fraction)
            fraction = spec.manifest["method"]["config"].get("eval_fraction", 0.1)
            train, held = split_holdout(rows, fraction, spec.manifest.get("seed", 0))
            held_path = Path(source)
    except DataError as e:
        opts.log(f"update: cannot re-read {source} ({e}): night 1 has no guard set")
        return memory
    rng = seeded_rng(opts.seed, "seed")
    if held:
        held = rng.sample(held, GUARD_CAP) if len(held) > GUARD_CAP else held
        memory.nights.append(NightRecord(1, version, {"source": Path(source).name, "examples": len(train),
                                                      "seeded_from": "the data the fit recorded"},
                                         stored(held, held_path, store)))
    memory.offer(stored(train, Path(source), store), REPLAY_SIZE, rng)
    return memory
