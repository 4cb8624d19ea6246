"""Shared fixtures: an isolated headstart cache, the real data root, and tiny generated datasets.

Tier 2 of the suite (STYLE.md §7): tiny random bases (`tiny-image`, `tiny-text`, `tiny-llm`)
on the tiny datasets generated here, so an end-to-end fit takes well under a second.
"""
from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

# Torch's intra-op thread pool spins for its peers: with 2 threads on 2 cores and any other
# process busy, one tiny-model step measured ~90x slower (1.9 s vs 0.02 s). The tiny bases gain
# nothing from a second thread, so the suite (and the subprocesses it starts, which inherit the
# environment) runs one thread per process unless the caller chose otherwise. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The venv's bin folder: `headstart` and `accelerate` live beside this Python."""

IMAGE_CLASSES = ("blue", "green", "red")
TEXT_CLASSES = ("food", "sport", "tech")
TEXT_WORDS = {
    "food": ["pizza", "bread", "soup", "cheese", "apple", "pasta", "salad", "butter"],
    "sport": ["goal", "match", "team", "score", "ball", "coach", "league", "referee"],
    "tech": ["laptop", "code", "server", "chip", "cloud", "compiler", "router", "kernel"],
}
FILLER = ["the", "a", "very", "today", "and", "my", "with", "some"]


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Point $HEADSTART_CACHE at a session temp dir before any test module is even imported.

    `config._tmp_path_factory` is the object the `tmp_path_factory` fixture returns; it exists
    once pytest's tmpdir plugin is configured (hence trylast). A fixture would run only after
    collection, too late if a module computed a cache path at import.
    """
    if os.environ.get("HEADSTART_CACHE"):
        return  # the caller chose a cache (e.g. to reuse dequantised bases): keep it
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        from _pytest.tmpdir import TempPathFactory

        factory = TempPathFactory.from_config(config, _ispytest=True)
    os.environ["HEADSTART_CACHE"] = str(factory.mktemp("headstart-cache"))


def pytest_sessionstart(session: pytest.Session) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# ---- real data ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real datasets: `$HEADSTART_DATA`, else `<repo>/../shared/data`."""
    root = Path(os.environ.get("HEADSTART_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set HEADSTART_DATA)")
    return root


# ---- tiny generated data --------------------------------------------------------------------

def _class_image(cls: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A colour + pattern per class, with noise: learnable, yet thousands of colours (not a placeholder)."""
    base = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}[cls]
    a = np.empty((size, size, 3), dtype=np.float64)
    a[...] = base
    if cls == "red":
        a[::6, :, :] = 255  # horizontal stripes
    elif cls == "green":
        a[:, ::6, :] = 0  # vertical stripes
    else:
        yy, xx = np.mgrid[:size, :size]
        a[((yy // 8 + xx // 8) % 2) == 0] *= 0.4  # checkerboard
    a += rng.normal(0, 20, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    """`<root>/{train,val}/{blue,green,red}/*.png`: 8 images per class and split, 48x48.

    Also one corrupt file (`train/red/x.jpg`, random bytes) that must be skipped with a reason,
    and one name with a space (`train/green/with space.png`) that must load and be counted.
    Session-scoped: tests must not modify it (copy it first).
    """
    root = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in IMAGE_CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(8):
                name = "with space.png" if (split, cls, i) == ("train", "green", 0) else f"{cls}_{i}.png"
                _class_image(cls, rng).save(d / name)
    (root / "train" / "red" / "x.jpg").write_bytes(random.Random(0).randbytes(512))
    return root


def text_rows(n: int, seed: int, classes=TEXT_CLASSES) -> list[tuple[str, str]]:
    """`n` (text, label) rows, classes in turn: each text mixes 3 class keywords with filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = [rng.choice(TEXT_WORDS[label]) for _ in range(3)] + [rng.choice(FILLER) for _ in range(2)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_table(path: Path, rows: list[tuple[str, str]], columns=("text", "label")) -> Path:
    """CSV / TSV / JSONL by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        import json

        path.write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows))
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writerow(columns)
        w.writerows(rows)
    return path


def sampled_copy(src: Path, dst: Path, rows: int) -> Path:
    """Each CSV split of a text dataset, cut to a seeded sample of `rows` rows (all of a smaller one)."""
    dst.mkdir()
    for split in sorted(src.glob("*.csv")):
        with open(split, newline="") as f:
            table = list(csv.DictReader(f))
        keep = random.Random(0).sample(table, min(rows, len(table)))
        write_table(dst / split.name, [(r["text"], r["label"]) for r in keep])
    return dst


def load_bench_module(name: str):
    """bench/ is a folder of scripts, not a package: load `bench/<name>.py` as module `name`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_text_csv(tmp_path_factory) -> Path:
    """A folder with `train.csv` (60 rows) and `test.csv` (30 rows): a 3-class keyword task."""
    root = tmp_path_factory.mktemp("tiny-text")
    write_table(root / "train.csv", text_rows(60, seed=0))
    write_table(root / "test.csv", text_rows(30, seed=1))
    return root


@pytest.fixture
def image_folder_copy(tiny_image_folder, tmp_path) -> Path:
    """A private, writable copy of `tiny_image_folder`."""
    dst = tmp_path / "images"
    shutil.copytree(tiny_image_folder, dst)
    return dst


# ---- subprocesses ---------------------------------------------------------------------------

def run_cmd(cmd: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group and fail.

    `subprocess.run(timeout=...)` kills only the direct child, then waits on pipes that
    grandchildren (torchrun workers) may hold open forever: a hang, not a failure.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n--- stderr tail ---\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---- the CLI as a user runs it -------------------------------------------------------------------

def headstart_cli(*args, timeout: float = 180):
    """Run the venv's `headstart` console script in a subprocess."""
    return run_cmd([str(BIN / "headstart"), *map(str, args)], timeout=timeout)


def assert_clean_error(result, *needles: str) -> str:
    """Exit 2, and stderr ends with ONE `headstart: error:` line; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr.strip().splitlines()[-3:])
    assert "Traceback" not in result.stderr, result.stderr.strip().splitlines()[-3:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("headstart: error:")]
    assert len(errors) == 1, result.stderr.strip().splitlines()[-3:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == errors[0], "the error line must be the last thing printed"
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])
    return errors[0]


def kill_after_first_checkpoint(cmd: list[str], checkpoint: Path, timeout: float = 180) -> None:
    """Start `cmd`, wait until `checkpoint/state.json` exists, then kill -9 it (asserting it died that way)."""
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (checkpoint / "state.json").exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, f"no checkpoint after {timeout} s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
