"""Image training and feature extraction inside a memory budget (issue 16): the batch comes from the budget and
the measured cost of one image, a run that cannot fit fails before it starts, and the plans change no result."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headstart
from headstart.bases import image as image_bases
from headstart.data import load_dataset, loader_for
from headstart.engine import features
from headstart.engine.memory import GB, MB, Budget, MemoryBudgetError, rss_bytes
from headstart.engine.perf import tune_allocator
from headstart.methods.base import SpecialistModel
from headstart.methods.finetune.memory import plan_training, train_example_bytes

ROOT = Path(__file__).resolve().parents[1]


def budget_above_now(extra: int) -> Budget:
    return Budget(rss_bytes() + extra, "--memory-budget")


@pytest.fixture(scope="module")
def tiny(tiny_image_folder):
    base = headstart.load_base("tiny-image")
    return base, load_dataset(tiny_image_folder).split("train")


def test_extraction_batch_follows_the_budget(tiny):
    base, _ = tiny
    cost = base.example_bytes()
    assert cost > 0
    assert features.extraction_batch(base, 64, Budget(64 * GB, "test")) <= 64
    # Room for 2 images (plus a little) above what the process holds: 2 per forward at most.
    assert features.extraction_batch(base, 64, budget_above_now(2 * cost + cost // 2)) <= 2
    with pytest.raises(MemoryBudgetError, match="feature extraction"):
        features.extraction_batch(base, 64, Budget(64 * MB, "--memory-budget"))


def test_a_fast_batch_caps_the_request_however_large_the_budget(tiny, monkeypatch):
    base, _ = tiny
    cost = base.example_bytes()
    monkeypatch.setattr(image_bases, "INFERENCE_ACTIVATIONS", 3 * cost)
    assert features.extraction_batch(base, 64, Budget(64 * GB, "test")) == 3


def test_the_planned_batch_changes_no_feature(tiny, monkeypatch):
    base, train = tiny
    items = train.items[:7]
    whole = features.encode(base, items, loader_for("image"), 64, progress=False)
    monkeypatch.setattr(image_bases, "INFERENCE_ACTIVATIONS", 2 * base.example_bytes())
    planned = features.encode(base, items, loader_for("image"), 64, progress=False)
    torch.testing.assert_close(planned, whole, rtol=1e-4, atol=1e-5)


def test_inference_through_an_image_base_runs_in_parts_and_training_does_not(tiny, monkeypatch):
    base, train = tiny
    pixels = base.collate([loader_for("image")(p) for p in train.items[:5]], False)["pixel_values"]
    base.eval()
    with torch.no_grad():
        whole = base(pixel_values=pixels)
    monkeypatch.setattr(image_bases, "INFERENCE_ACTIVATIONS", 2 * base.example_bytes())
    seen = []
    first = next(m for m in base.model.modules() if next(m.children(), None) is None)
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        with torch.no_grad():
            parts = base(pixel_values=pixels)
        assert seen[-3:] == [2, 2, 1]
        base(pixel_values=pixels)  # gradients on: one forward, the trainer's plan sized it
        assert seen[-1] == 5
    finally:
        handle.remove()
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("micro", [4, 3])
def test_the_engine_accumulates_micro_batches_into_the_whole_batch_step(micro):
    """One optimizer step on 10 examples, whole or in parts of `micro` (4 + 4 + 2, 3 + 3 + 3 + 1): same
    weights after, same reported loss (each part weighted by its size, as the mean loss is)."""
    from headstart.engine.batches import EpochShuffle
    from headstart.engine.trainer import TrainSettings, train

    x, y = torch.randn(10, 5, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3
    results = []
    for micro_batch in (0, micro):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)

        def step(idx, progress, model=model):
            return torch.nn.functional.cross_entropy(model(x[idx]), y[idx]), {}, len(idx)

        out = train(model, plan=EpochShuffle(10, 10, 1, seed=0), step_loss=step,
                    param_groups=[{"params": list(model.parameters()), "lr": 0.1}],
                    settings=TrainSettings(lr_schedule=lambda s, t: 1.0, micro_batch=micro_batch), progress=False,
                    log=lambda _: None)
        results.append((model.weight.detach().clone(), out.history[-1]["loss"]))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)


def test_finetune_plan_fails_up_front_with_the_numbers(tiny):
    base, train = tiny
    model = SpecialistModel(base, 2).train()
    example = model.collate([loader_for("image")(train.items[0])], False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = train_example_bytes(model, example)
    assert cost > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    with pytest.raises(MemoryBudgetError, match="finetune"):
        plan_training(model, example, 8, Budget(64 * MB, "--memory-budget"), log=lambda _: None)
    plan = plan_training(model, example, 8, Budget(64 * GB, "test"), log=lambda _: None)
    assert 8 % plan.micro_batch == 0 and plan.micro_batch * plan.accumulation == 8


def test_the_allocator_tuning_needs_room_in_the_budget():
    assert tune_allocator(Budget(1 * GB, "--memory-budget"), planned_peak=1 * GB) is False


def test_a_probe_leaves_the_allocator_alone_and_finetune_reports_its_plan(tiny_image_folder, monkeypatch, tmp_path):
    import headstart.engine.perf as perf

    calls = []
    monkeypatch.setattr(perf, "tune_allocator", lambda *a, **k: calls.append(a) or False)
    headstart.fit(tiny_image_folder, base="tiny-image", method="probe", progress=False, out=tmp_path / "p")
    assert calls == []
    spec = headstart.fit(tiny_image_folder, base="tiny-image", method="finetune", epochs=1, batch_size=4,
                         progress=False, out=tmp_path / "f")
    details = spec.manifest["details"]
    assert 4 % details["micro_batch"] == 0 and details["memory_estimate_mb"] > 0


def test_footprint_bench_quick_runs(tmp_path):
    out = tmp_path / "footprint.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "footprint.py"), "--quick", "--configs",
                           "probe,finetune", "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| probe |" in done.stdout and out.exists()
