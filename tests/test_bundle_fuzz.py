"""Fuzzing bundle loading: mutated manifests, weight files and adapter folders of tiny bundles.

Whatever is done to a bundle, `headstart.load` (and a prediction on what loaded) either works or
raises one HeadstartError line: no other exception, and no code from the bundle runs (a pickle
payload that would create a marker file never does). Examples are bounded and derandomised, so
the run is fast and the same every time.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headstart
from headstart.bundle import commands
from headstart.core.errors import HeadstartError

QUIET = {"progress": False, "log": lambda s: None}
EXAMPLES = int(os.environ.get("HEADSTART_FUZZ_EXAMPLES", "40"))  # raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MARKER = Path(tempfile.gettempdir()) / "headstart-fuzz-code-ran"


class Payload:
    """Unpickling this creates MARKER: it must never happen."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


PICKLE = pickle.dumps(Payload(), protocol=4)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
LOAD_BEARING = ("format", "format_version", "kind", "task", "base", "method", "classes", "heads", "adapters", "files",
                "preprocessing")
"""Top-level manifest keys loading reads: most mutations go there rather than into history or metrics."""


@pytest.fixture(scope="module")
def bundles(tiny_text_csv, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", out=root / "probe", **QUIET)
    headstart.fit(tiny_text_csv, base="tiny-text", method="lora", epochs=1, r=2, out=root / "lora", **QUIET)
    rows = [{"instruction": f"Colour of {x}?", "output": c} for x, c in [("snow", "white"), ("coal", "black")] * 4]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    headstart.fit(root / "sft.jsonl", base="tiny-llm", method="lora", task="sft", out=root / "sft", epochs=1,
                  batch_size=4, max_length=48, side_by_side=0, bf16="false", **QUIET)
    return {"probe": root / "probe", "lora": root / "lora", "sft": root / "sft"}


def load_and_use(source: Path, mutate) -> None:
    """Copy the bundle, mutate the copy, load and predict: only HeadstartError may escape."""
    MARKER.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bundle"
        shutil.copytree(source, folder)
        mutate(folder)
        try:
            commands.predict(headstart.load(folder), ["goal team match", "pizza soup"], max_new_tokens=2)
        except HeadstartError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
    assert not MARKER.exists(), "code from the bundle ran"


def paths_of(value, prefix=()):
    """Every (path) into a JSON tree, the root included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_of(v, prefix + (i,))


def set_at(tree, path, value, delete: bool):
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return tree


@FUZZ
@given(which=st.sampled_from(["probe", "lora", "sft"]), pick=st.integers(0, 10**6), value=JSON_VALUES,
       delete=st.booleans(), focus=st.integers(0, 3))
def test_mutated_manifest_values(bundles, which, pick, value, delete, focus):
    def mutate(folder: Path) -> None:
        path = folder / "manifest.json"
        manifest = json.loads(path.read_text())
        paths = [p for p in paths_of(manifest) if not focus or (p and p[0] in LOAD_BEARING)]
        where = paths[pick % len(paths)]
        path.write_text(json.dumps(set_at(manifest, where, value, delete and bool(where))))

    load_and_use(bundles[which], mutate)


@FUZZ
@given(which=st.sampled_from(["lora", "sft"]), pick=st.integers(0, 10**6), value=JSON_VALUES, delete=st.booleans())
def test_mutated_adapter_config_values(bundles, which, pick, value, delete):
    def mutate(folder: Path) -> None:
        path = folder / "adapter" / "adapter_config.json"
        config = json.loads(path.read_text())
        paths = list(paths_of(config))
        where = paths[pick % len(paths)]
        path.write_text(json.dumps(set_at(config, where, value, delete and bool(where))))

    load_and_use(bundles[which], mutate)


def byte_mutation():
    """(kind, position fraction, payload) applied to a file's bytes."""
    return st.tuples(st.sampled_from(["truncate", "flip", "insert", "replace", "pickle", "empty"]),
                     st.floats(0, 1), st.binary(min_size=1, max_size=16))


def mutate_bytes(path: Path, mutation) -> None:
    kind, where, payload = mutation
    data = path.read_bytes()
    at = int(where * len(data))
    data = {"truncate": lambda: data[:at],
            "flip": lambda: data[:at] + bytes([data[at % len(data)] ^ 0xFF]) + data[at + 1:],
            "insert": lambda: data[:at] + payload + data[at:],
            "replace": lambda: data[:at] + payload + data[at + len(payload):],
            "pickle": lambda: PICKLE,
            "empty": lambda: b""}[kind]()
    path.write_bytes(data)


@FUZZ
@given(which=st.sampled_from(["probe", "lora"]), mutation=byte_mutation(),
       target=st.sampled_from(["manifest.json", "trained.safetensors"]))
def test_mutated_manifest_and_weight_bytes(bundles, which, mutation, target):
    load_and_use(bundles[which], lambda folder: mutate_bytes(folder / target, mutation))


@FUZZ
@given(which=st.sampled_from(["lora", "sft"]), mutation=byte_mutation(),
       target=st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]),
       extra=st.sampled_from([None, "adapter_model.bin", "pytorch_model.bin", "adapter_model.pt"]))
def test_mutated_adapter_folder(bundles, which, mutation, target, extra):
    def mutate(folder: Path) -> None:
        mutate_bytes(folder / "adapter" / target, mutation)
        if extra:
            (folder / "adapter" / extra).write_bytes(PICKLE)

    load_and_use(bundles[which], mutate)


@pytest.mark.parametrize("which", ["lora", "sft"])
def test_torch_load_is_never_reached(bundles, monkeypatch, which):
    """The adapter pickle case without the fuzzer: PEFT would torch.load a lone adapter_model.bin."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))

    def mutate(folder: Path) -> None:
        (folder / "adapter" / "adapter_model.safetensors").unlink()
        (folder / "adapter" / "adapter_model.bin").write_bytes(PICKLE)

    load_and_use(bundles[which], mutate)
