"""Multi-task training (combine/multitask.py): one shared body + a head per task, tasks mixed by temperature
sampling, a resumable run, a bundle that loads per task."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import headstart
from headstart.combine.multitask import fit_multitask
from headstart.combine.multitask_parts import TaskMixture, task_probabilities
from headstart.core.errors import ConfigError

from bundle_fixtures import QUIET, one_line
from conftest import sampled_copy, text_rows, write_table

FAST = {"base": "tiny-text", "r": 2, "batch_size": 8, **QUIET}


def _topic(root: Path) -> Path:
    """food / sport / tech by keywords."""
    write_table(root / "train.csv", text_rows(48, seed=0))
    write_table(root / "val.csv", text_rows(24, seed=100))
    write_table(root / "test.csv", text_rows(24, seed=200))
    return root


def _is_food(root: Path) -> Path:
    """Another label set over the same texts: yes / no (food or not); fewer examples."""
    def rows(n, seed):
        return [(text, "yes" if label == "food" else "no") for text, label in text_rows(n, seed=seed)]

    write_table(root / "train.csv", rows(24, 1))
    write_table(root / "val.csv", rows(24, 101))
    write_table(root / "test.csv", rows(24, 201))
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multitask")
    return {"topic": _topic(root / "topic"), "food": _is_food(root / "food")}


@pytest.fixture(scope="module")
def lora_bundle(tasks, tmp_path_factory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("mt") / "multi"
    spec = fit_multitask(tasks, method="lora", epochs=4, seed=0, out=out, **FAST)
    return spec, out


# ---- the plan ------------------------------------------------------------------------------

def test_task_probabilities_follow_the_temperature():
    assert task_probabilities([900, 100], 1.0) == pytest.approx([0.9, 0.1])
    assert task_probabilities([900, 100], 2.0) == pytest.approx([0.75, 0.25])
    assert task_probabilities([900, 100], float("inf")) == pytest.approx([0.5, 0.5])
    with pytest.raises(ConfigError):
        task_probabilities([10, 10], 0.0)


@pytest.mark.parametrize("temperature,share", [(1.0, 0.9), (2.0, 0.75), (float("inf"), 0.5)])
def test_mixture_draws_tasks_in_the_sampled_proportions(temperature, share):
    plan = TaskMixture([900, 100], batch_size=10, epochs=20, seed=3, temperature=temperature)
    batches = [b for e in range(plan.epochs) for b in plan.batches(e)]
    assert len(batches) == 20 * 100  # an epoch = one pass over all examples' worth of steps
    counts = Counter(plan.task_of(b[0]) for b in batches)
    assert counts[0] / len(batches) == pytest.approx(share, abs=0.03)
    for b in batches:  # every batch is one task's, of real examples of it
        task = plan.task_of(b[0])
        assert len(b) == 10 and {plan.task_of(i) for i in b} == {task}
        assert all(plan.offsets[task] <= i < plan.offsets[task] + plan.sizes[task] for i in b)


def test_mixture_is_a_pure_function_of_seed_and_epoch():
    plan = TaskMixture([30, 7], batch_size=4, epochs=3, seed=1, temperature=2.0)
    again = TaskMixture([30, 7], batch_size=4, epochs=3, seed=1, temperature=2.0)
    assert plan.batches(1) == again.batches(1)
    assert plan.batches(0) != plan.batches(1)
    assert TaskMixture([30, 7], 4, 3, seed=2).batches(0) != plan.batches(0)
    small = [b for b in plan.batches(0) if plan.task_of(b[0]) == 1]
    # A small task cycles through its examples (all of them before any repeats) rather than running dry.
    seen = [i for b in small for i in b]
    assert sorted(seen[:7]) == list(range(30, 37))


# ---- the bundle ----------------------------------------------------------------------------

def test_bundle_loads_per_task_and_predicts_that_tasks_labels(lora_bundle, tasks):
    spec, out = lora_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["heads"]) == {"topic", "food"}  # no default head: a caller must pick
    assert manifest["heads"]["food"]["classes"] == ["no", "yes"]
    topic = manifest["data"]["tasks"]["topic"]
    assert topic["classes"] == ["food", "sport", "tech"] and topic["train_examples"] == 48
    assert topic["source"] == str(tasks["topic"])
    assert manifest["data"]["tasks"]["food"]["train_examples"] == 24
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # one shared PEFT adapter
    texts = ["pizza bread soup", "goal team match", "laptop code chip", "cheese with apple"]
    for name, classes in (("topic", {"food", "sport", "tech"}), ("food", {"no", "yes"})):
        loaded = headstart.load(out, head=name)
        assert set(loaded.classes) == classes
        assert set(loaded.predict(texts)) <= classes
        # The bundle as written scores what the fit reported for this task.
        m = loaded.evaluate(tasks[name], progress=False)
        assert m["accuracy"] == pytest.approx(manifest["metrics"]["tasks"][name]["accuracy"], abs=1e-6)
    with pytest.raises(Exception) as e:
        headstart.load(out)
    assert "topic" in one_line(e) and "food" in one_line(e)


def test_metrics_hold_each_task_and_their_mean(lora_bundle):
    spec, _ = lora_bundle
    metrics = spec.manifest["metrics"]
    per_task = metrics["tasks"]
    assert set(per_task) == {"topic", "food"}
    assert metrics["accuracy"] == pytest.approx(sum(t["accuracy"] for t in per_task.values()) / 2, abs=1e-5)
    assert all(t["split"] == "test" for t in per_task.values())
    assert metrics["accuracy"] > 0.8, metrics  # keywords are learnable even on a random tiny body
    mt = spec.manifest["details"]["multitask"]
    assert mt["probabilities"] == pytest.approx({"topic": 48 ** 0.5 / (48 ** 0.5 + 24 ** 0.5),
                                                 "food": 24 ** 0.5 / (48 ** 0.5 + 24 ** 0.5)}, abs=1e-5)
    history = spec.manifest["history"]
    assert len(history) == 4 and all("val_accuracy_topic" in h and "val_accuracy_food" in h for h in history)


def test_finetune_shares_unfrozen_blocks(tasks, tmp_path):
    out = tmp_path / "ft"
    fit_multitask(tasks, method="finetune", epochs=1, unfreeze="1", out=out, base="tiny-text", batch_size=8, **QUIET)
    stored = load_file(out / "trained.safetensors")
    assert any(k.startswith("backbone.") for k in stored)  # the shared block is stored once
    for name in ("topic", "food"):
        heads = load_file(out / "heads" / f"{name}.safetensors")
        assert set(heads) == {"head.weight", "head.bias"}
        assert set(headstart.load(out, head=name).predict(["pizza soup"])) <= {"food", "sport", "tech", "no", "yes"}


def test_image_tasks_share_one_adapter(tiny_image_folder, tmp_path):
    out = tmp_path / "img"
    spec = fit_multitask({"colour": tiny_image_folder, "again": tiny_image_folder}, base="tiny-image", method="lora",
                         epochs=1, r=2, batch_size=8, out=out, **QUIET)
    assert set(spec.manifest["metrics"]["tasks"]) == {"colour", "again"}
    assert headstart.load(out, head="again").classes == ["blue", "green", "red"]


def test_mixed_kinds_are_refused(tasks, tiny_image_folder):
    from headstart.core.errors import DataError

    with pytest.raises(DataError) as e:
        fit_multitask({"text": tasks["topic"], "image": tiny_image_folder}, **FAST)
    assert "image and text" in one_line(e)


def test_other_methods_are_refused_by_name(tasks):
    with pytest.raises(ConfigError) as e:
        fit_multitask(tasks, method="probe", **{k: v for k, v in FAST.items() if k != "r"})
    assert "lora" in one_line(e) and "finetune" in one_line(e) and "probe" in one_line(e)


# ---- resume ----------------------------------------------------------------------------------

def test_resume_after_interrupt_gives_the_same_weights(tasks, tmp_path, monkeypatch):
    from headstart.methods.lora.method import Lora

    opts = dict(method="lora", epochs=3, patience=0, seed=0, **FAST)
    fit_multitask(tasks, out=tmp_path / "ref", **opts)
    original = Lora.set_mode

    def interrupt_at_epoch_2(self, model, epoch):
        if epoch == 1:  # 0-based: epoch 1 is done and checkpointed
            raise KeyboardInterrupt
        return original(self, model, epoch)

    monkeypatch.setattr(Lora, "set_mode", interrupt_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit_multitask(tasks, out=tmp_path / "run", **opts)
    monkeypatch.undo()
    ckpt = tmp_path / ".run.checkpoint"
    assert (ckpt / "state.json").is_file()
    logs: list[str] = []
    fit_multitask(tasks, out=tmp_path / "run", resume=True, **{**opts, "log": logs.append})
    assert any("resumed" in line for line in logs), logs
    assert not ckpt.exists()
    ref, run = tmp_path / "ref", tmp_path / "run"
    for rel in ("trained.safetensors", "heads/topic.safetensors", "heads/food.safetensors",
                "adapter/adapter_model.safetensors"):
        a, b = load_file(ref / rel), load_file(run / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    hist = [json.loads((f / "manifest.json").read_text())["history"] for f in (ref, run)]
    assert [h["val_accuracy"] for h in hist[0]] == [h["val_accuracy"] for h in hist[1]]


# ---- real ----------------------------------------------------------------------------------

@pytest.mark.real
def test_real_two_tasks_on_minilm(data_root, tmp_path):
    out = tmp_path / "sst2-trec"
    # seeded 500-row samples of each split: the lora model is scored on every test row (sst2's are 1,821)
    tasks = {name: sampled_copy(data_root / name, tmp_path / name, 500) for name in ("sst2", "trec")}
    spec = fit_multitask(tasks, base="minilm-l6", method="lora", shots=16, epochs=1, seed=0, out=out, **QUIET)
    metrics = spec.manifest["metrics"]
    assert set(metrics["tasks"]) == {"sst2", "trec"}
    assert metrics["tasks"]["trec"]["accuracy"] > 0.3  # 6 classes: chance ~0.2
    assert metrics["tasks"]["sst2"]["accuracy"] > 0.5
    trec = headstart.load(out, head="trec")
    assert set(trec.predict(["How many miles is it from London to Paris ?"])) <= set(trec.classes)
    assert set(headstart.load(out, head="sst2").classes) == set(spec.manifest["data"]["tasks"]["sst2"]["classes"])
