"""The engine under `accelerate launch` with 2 CPU processes: one run, one bundle.

Why not `accelerate launch --cpu --num_processes 2`: with `--cpu`, accelerate (1.x) uses its
simple launcher, which starts ONE process unless an MPI hostfile is given; the test would pass
without ever going distributed. `--multi_gpu` starts 2 processes through torchrun, and
ACCELERATE_USE_CPU=true makes each Accelerator pick the MULTI_CPU (gloo) backend. The manifest's
`details.num_processes` proves that 2 processes trained.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from conftest import BIN, run_cmd

import headstart

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_fit(tiny_text_csv, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ddp")
    out = runs / "bundle"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "headstart.cli", "fit", str(tiny_text_csv), "--base", "tiny-text", "--method", "finetune",
           "--epochs", "2", "--out", str(out), "--json"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = run_cmd(cmd, timeout=240, env=env)  # kills the whole process group on timeout: never hangs
    return result, runs, out


def test_two_cpu_processes_write_one_bundle(two_process_fit):
    result, runs, out = two_process_fit
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in runs.iterdir()) == ["bundle"], "temporary folders, checkpoints or a second bundle left"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["details"]["num_processes"] == 2, "accelerate did not run 2 processes"
    assert [h["epoch"] for h in manifest["history"]] == [1, 2]
    spec = headstart.load(out)
    assert spec.predict(["the team scored a goal"])[0] in spec.classes
    assert 0 <= manifest["metrics"]["accuracy"] <= 1


def test_two_cpu_processes_print_one_json_result(two_process_fit):
    result, _, out = two_process_fit
    assert result.returncode == 0, result.stderr[-4000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_f1", "wall_s", "trainable_params", "skipped"} <= set(last)
    json_lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1, f"fit --json printed {len(json_lines)} JSON objects (one per process?)"
    assert Path(last["bundle"]).resolve() == out.resolve()
