"""The one engine under `accelerate launch --num_processes 2`, and kill -9 + resume, for every trainable method.

Why `--multi_gpu` with ACCELERATE_USE_CPU=true: see test_accelerate.py (with `--cpu` accelerate 1.x
starts one process). One launch fits every method in turn, to pay the start-up once.

Tolerances, stated: each process trains on its own share of every batch and the engine averages the
gradients weighted by share size, so for a per-example mean loss without randomness in the step the two
runs are the same up to float summation order (the toy test: 1e-6). The real methods have dropout (the
tiny bases' 0.1, LoRA's 0.05), and SetFit's pairs only form within a share, so the random streams differ
by process: classifiers' stored weights must agree within 1.5% (global relative L2), LLM adapters
(whose weights are all training delta) within 10%, and the held-out figures must agree closely.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import BIN, kill_after_first_checkpoint, run_cmd
from safetensors.torch import load_file
from test_adapt import shifted_text_rows
from test_accelerate import free_port
from test_llm_tasks import ANSWERS, alpaca_rows, write_jsonl

import headstart
from conftest import write_table

pytestmark = pytest.mark.slow

LAUNCH = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

# ---- the engine itself: exact agreement on a toy model ------------------------------------------

TOY = """
import sys, torch
from torch import nn
from safetensors.torch import save_file
from headstart.engine.batches import EpochShuffle
from headstart.engine.schedule import warmup_cosine_schedule
from headstart.engine.trainer import TrainSettings, train

g = torch.Generator().manual_seed(0)
x, y = torch.randn(11, 5, generator=g), torch.arange(11) % 3
torch.manual_seed(0)
model = nn.Linear(5, 3)

def step(idx, progress):
    return nn.functional.cross_entropy(model(x[idx]), y[idx]), {}, len(idx)

# 11 examples in batches of 4: shares of 2+2 and, for the last batch of 3, 2+1 (the weighting matters).
result = train(model, plan=EpochShuffle(11, 4, epochs=3, seed=1), step_loss=step,
               param_groups=[{"params": list(model.parameters()), "lr": 0.1}],
               settings=TrainSettings(lr_schedule=warmup_cosine_schedule(0.2)), progress=False, log=lambda s: None)
if result.is_main_process:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
    print("PROCESSES", result.num_processes)
"""


def test_two_processes_match_one_exactly_on_a_toy_model(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    one = run_cmd([sys.executable, str(script), str(tmp_path / "one.safetensors")], env=ENV, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cmd(LAUNCH + ["--main_process_port", str(free_port()), str(script), str(tmp_path / "two.safetensors")],
                  env=ENV, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "PROCESSES 2" in two.stdout and "PROCESSES 1" in one.stdout
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert not torch.equal(a["weight"], nn_init_weight()), "the toy model did not train"


def nn_init_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3).weight.detach()


# ---- every trainable method: one process vs two ------------------------------------------------

RUNNER = """
import json, sys
import headstart
for run in json.loads(open(sys.argv[1]).read()):
    headstart.fit(run["data"], out=run["out"], progress=False, log=lambda s: None, **run["kwargs"])
"""
LLM = {"epochs": 1, "batch_size": 4, "lr": 5e-3, "max_length": 96, "bf16": "false"}


def method_runs(root: Path, tiny_text_csv: Path) -> dict[str, tuple[str, dict]]:
    target = write_table(root / "target.csv", shifted_text_rows(60, seed=2))
    sft = write_jsonl(root / "sft.jsonl", alpaca_rows(24))
    prefs = write_jsonl(root / "prefs.jsonl", [{"prompt": f"What is the {q}?", "chosen": a, "rejected": "purple"}
                                               for q, a in ANSWERS.items()] * 3)
    text = str(tiny_text_csv)
    return {
        "probe": (text, dict(base="tiny-text", method="probe")),  # closed form: no engine, still one writer
        "finetune": (text, dict(base="tiny-text", method="finetune", epochs=2)),
        "lora": (text, dict(base="tiny-text", method="lora", epochs=2)),
        "scratch": (text, dict(base="tiny-text", method="scratch", epochs=2)),
        "setfit": (text, dict(base="tiny-text", method="setfit", max_steps=6)),
        "dann": (text, dict(base="tiny-text", method="dann", epochs=2, target=str(target))),
        "coral": (text, dict(base="tiny-text", method="coral", backbone="lora", epochs=2, target=str(target))),
        "selftrain": (text, dict(base="tiny-text", method="selftrain", backbone="lora", epochs=2, target=str(target))),
        "sft": (str(sft), dict(base="tiny-llm", method="lora", task="sft", side_by_side=0, **LLM)),
        "qlora": (str(sft), dict(base="tiny-llm", method="qlora", task="sft", side_by_side=0, **LLM)),
        "dpo": (str(prefs), dict(base="tiny-llm", method="lora", task="dpo", **LLM)),
    }


@pytest.fixture(scope="module")
def one_and_two(tiny_text_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods-ddp")
    runs = method_runs(root, tiny_text_csv)
    for name, (data, kwargs) in runs.items():
        headstart.fit(data, out=root / "one" / name, progress=False, log=lambda s: None, **kwargs)
    spec = root / "two.json"
    spec.write_text(json.dumps([{"data": d, "out": str(root / "two" / n), "kwargs": kw} for n, (d, kw) in runs.items()]))
    script = root / "runner.py"
    script.write_text(RUNNER)
    result = run_cmd(LAUNCH + ["--main_process_port", str(free_port()), str(script), str(spec)], env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, list(runs)


def stored_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(bundle.rglob("*.safetensors")):
        out.update({f"{f.relative_to(bundle)}:{k}": v.float() for k, v in load_file(f).items()})
    return out


HELD_OUT = {"classify": ("accuracy", 0.1), "sft": ("eval_loss", 0.01), "dpo": ("eval_dpo_loss", 0.01)}


@pytest.mark.parametrize("name", ["finetune", "lora", "scratch", "setfit", "dann", "coral", "selftrain", "sft",
                                  "qlora", "dpo"])
def test_two_processes_train_like_one(one_and_two, name):
    root, _ = one_and_two
    one, two = root / "one" / name, root / "two" / name
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2, "accelerate did not run 2 processes"
    assert json.loads((one / "manifest.json").read_text())["training"]["processes"] == 1
    a, b = stored_tensors(one), stored_tensors(two)
    assert a.keys() == b.keys() and a
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5 / sum((a[k] ** 2).sum() for k in a) ** 0.5
    task = manifest.get("task", "classify")
    assert diff < (0.10 if task in ("sft", "dpo") else 0.015), f"stored weights differ by {diff:.4f} (relative L2)"
    key, tol = HELD_OUT.get(task, HELD_OUT["classify"])
    m1, m2 = json.loads((one / "manifest.json").read_text())["metrics"][key], manifest["metrics"][key]
    assert abs(m1 - m2) <= tol * (1 if key == "accuracy" else abs(m1)), (key, m1, m2)


def test_a_closed_form_method_under_two_processes_writes_one_bundle(one_and_two):
    root, _ = one_and_two
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted(p.name for p in (root / "one").iterdir()), \
        "a second writer left temporary folders or the run lost a bundle"
    for runs in (root / "one", root / "two"):
        leftovers = [p.name for p in runs.iterdir() if p.name.startswith(".")]
        assert not leftovers, f"checkpoints or temporary folders left beside the bundles: {leftovers}"
    a, b = stored_tensors(root / "one" / "probe"), stored_tensors(root / "two" / "probe")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the same closed-form solve"


# ---- kill -9 mid-run, then resume: bit-identical final weights ----------------------------------

KILLABLE = """
import json, sys, headstart
data, out, resume, kwargs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4])
headstart.fit(data, out=out, resume=resume, progress=False, log=lambda s: print(s, flush=True), **kwargs)
"""


KILL_CASES = {
    "lora": dict(base="tiny-text", method="lora", epochs=30, batch_size=4, patience=0),
    "setfit": dict(base="tiny-text", method="setfit", epochs=20, max_steps=200, batch_size=6),
    "sft": dict(base="tiny-llm", method="lora", task="sft", epochs=6, batch_size=2, checkpoint_every=2,
                side_by_side=0, max_length=96, bf16="false", lr=5e-3),
}


@pytest.mark.parametrize("name", list(KILL_CASES))
def test_kill_9_then_resume_gives_bit_identical_weights(name, tiny_text_csv, tmp_path):
    data = tiny_text_csv if name != "sft" else write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(24))
    kwargs = KILL_CASES[name]
    script = tmp_path / "fit.py"
    script.write_text(KILLABLE)
    ref = tmp_path / "ref"
    done = run_cmd([sys.executable, str(script), str(data), str(ref), "0", json.dumps(kwargs)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    cmd = [sys.executable, str(script), str(data), str(out)]
    kill_after_first_checkpoint(cmd + ["0", json.dumps(kwargs)], tmp_path / ".killed.checkpoint")
    assert not out.exists(), "the run finished before the kill: make it longer"
    resumed = run_cmd(cmd + ["1", json.dumps(kwargs)], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout, resumed.stdout[-2000:]
    a, b = stored_tensors(ref), stored_tensors(out)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
