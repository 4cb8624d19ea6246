"""`update` of a generator (sft) bundle, end to end on the tiny random Llama: a second night becomes
version 2, the journal skips rows learned before, L2-SP stays nearer the previous adapter than naive,
the loss guard rejects an update that forgets night 1, and the default store keeps no row text."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import headstart
from headstart.core.errors import ConfigError

QUIET = {"progress": False, "log": lambda s: None}
FAST = {"epochs": 3, "batch_size": 4, "lr": 5e-3, "max_length": 96, "side_by_side": 0, "bf16": "false"}
NIGHT1 = {"colour of the sky": "blue", "colour of grass": "green", "colour of snow": "white",
          "colour of coal": "black", "colour of blood": "red", "colour of a lemon": "yellow"}
NIGHT2 = {"sound a cat makes": "meow", "sound a dog makes": "woof", "sound a cow makes": "moo",
          "sound a duck makes": "quack", "sound a sheep makes": "baa"}


def rows(answers: dict[str, str], n: int, tag: str = "") -> list[dict]:
    items = list(answers.items())
    return [{"instruction": f"What is the {q}?{tag}", "input": f"Case {j}.", "output": a}
            for j, (q, a) in enumerate(items[j % len(items)] for j in range(n))]


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


@pytest.fixture(scope="module")
def night_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-nights")
    return {"root": root, "night1": write_jsonl(root / "night1.jsonl", rows(NIGHT1, 24)),
            "night2": write_jsonl(root / "night2.jsonl", rows(NIGHT2, 20)),
            "general": write_jsonl(root / "general.jsonl", rows(NIGHT1, 6, " Briefly."))}


@pytest.fixture(scope="module")
def sft_bundle(night_files):
    out = night_files["root"] / "bundle"
    headstart.fit(night_files["night1"], base="tiny-llm", method="lora", task="sft", out=out, **QUIET, **FAST)
    return out


def fresh_copy(bundle: Path, tmp_path: Path, name: str = "spec") -> Path:
    dst = tmp_path / name
    shutil.copytree(bundle, dst)
    return dst


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_second_night_becomes_version_2_and_a_rerun_has_nothing_new(sft_bundle, night_files, tmp_path):
    folder = fresh_copy(sft_bundle, tmp_path)
    report = headstart.update(folder, night_files["night2"], strategy="replay+l2sp", max_forgetting=None,
                              general_set=night_files["general"], **QUIET)
    assert report["accepted"] and report["version"] == 2 and report["scenario"] == "generative"
    assert report["store"] == "refs" and report["night_accuracy"] is None
    assert report["night_loss"] < report["night_loss_before"], report  # it learned the new answers
    assert set(report["guards"]) == {"1", "general"}  # night 1 seeded from the data the fit recorded
    assert report["held_back"] == 4 and report["replayed"] > 0 and report["trained_on"] == 16 + report["replayed"]
    spec = headstart.load(folder)
    assert spec.manifest["continual"]["version"] == 2 and len(spec.manifest["continual"]["nights"]) == 2
    assert isinstance(spec.generate("What is the sound a cat makes?", temperature=0.0, max_new_tokens=4), str)
    again = headstart.update(folder, night_files["night2"], **QUIET)
    assert again["nothing_new"] and again["version"] == 2 and again["already_learned"] == 20


def test_l2sp_stays_nearer_the_previous_adapter_and_lwf_forgets_less_than_naive(sft_bundle, night_files, tmp_path):
    before = adapter(sft_bundle)
    distance, drop = {}, {}
    for strategy, options in (("naive", {}), ("l2sp", {"l2sp_weight": 50.0}), ("lwf", {"lwf_weight": 5.0})):
        folder = fresh_copy(sft_bundle, tmp_path, strategy)
        report = headstart.update(folder, night_files["night2"], strategy=strategy, max_forgetting=None,
                                  **options, **QUIET)
        assert report["accepted"] and report["strategy"] == strategy
        after = adapter(folder / "v2")
        distance[strategy] = sum(float((after[k] - before[k]).square().sum()) for k in before) ** 0.5
        drop[strategy] = report["guards"]["1"]["drop"]
    assert 0 < distance["l2sp"] < 0.8 * distance["naive"], distance
    assert drop["naive"] > 0 and drop["lwf"] < drop["naive"], drop  # the old answers' distribution is kept


def test_the_loss_guard_rejects_an_update_that_forgets_night_1(sft_bundle, night_files, tmp_path):
    folder = fresh_copy(sft_bundle, tmp_path)
    report = headstart.update(folder, night_files["night2"], strategy="naive", max_forgetting=0.0, **QUIET)
    assert not report["accepted"] and report["retried"] and report["strategy"] == "l2sp"
    assert "night 1" in report["why_rejected"] and report["guards"]["1"]["drop"] > 0
    assert report["version"] == 1 and headstart.load(folder).manifest.get("continual") is None


def test_the_default_store_keeps_no_row_text(sft_bundle, night_files, tmp_path):
    folder = fresh_copy(sft_bundle, tmp_path)
    report = headstart.update(folder, night_files["night2"], strategy="replay", max_forgetting=None, **QUIET)
    assert report["accepted"] and report["store"] == "refs"
    texts = [r["instruction"] for r in rows(NIGHT1, 24) + rows(NIGHT2, 20)] + list(NIGHT2.values())
    needles = {t.encode() for t in texts if set(t) - set("0123456789abcdef")}  # never a piece of a hex hash
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert any(f.name == "journal.json" for f in files) and any("memory" in f.parts for f in files)
    for f in files:
        data = f.read_bytes()
        assert not [n for n in needles if n in data], f
    memory = json.loads((folder / "v2" / "memory" / "memory.json").read_text())
    assert memory["store"] == "refs" and memory["replay"]["refs"] and "raw" not in memory["replay"]


def test_ewc_lwf_joint_and_the_raw_store(sft_bundle, night_files, tmp_path):
    before = adapter(sft_bundle)
    folder = fresh_copy(sft_bundle, tmp_path, "ewc")
    report = headstart.update(folder, night_files["night2"], strategy="ewc+lwf", max_forgetting=None, **QUIET)
    assert report["accepted"] and report["night_loss"] < report["night_loss_before"]
    with safe_open(str(folder / "v2" / "memory" / "memory.safetensors"), "pt") as f:  # online EWC carried
        fisher = [k for k in f.keys() if k.startswith("fisher.")]
    assert len(fisher) == len(before) and all("lora_" in k for k in fisher)
    folder = fresh_copy(sft_bundle, tmp_path, "raw")
    report = headstart.update(folder, night_files["night2"], strategy="joint", replay_store="raw",
                              max_forgetting=None, **QUIET)
    assert report["accepted"] and report["replayed"] == 22  # night 1's training rows, read back from raw
    memory = json.loads((folder / "v2" / "memory" / "memory.json").read_text())
    assert memory["store"] == "raw" and len(memory["replay"]["raw"]) == 22 + 16  # joint keeps everything
    assert json.loads(memory["replay"]["raw"][0]) in rows(NIGHT1, 24)
    night3 = write_jsonl(tmp_path / "night3.jsonl", rows(NIGHT2, 12, " Again."))
    report = headstart.update(folder, night3, strategy="naive", max_forgetting=None, **QUIET)  # back to refs
    assert report["accepted"] and report["store"] == "refs" and report["version"] == 3
    v3 = (folder / "v3" / "memory" / "memory.json").read_text()
    assert '"raw"' not in v3 and "What is the" not in v3  # the opted-in copies are gone with the option


def test_generator_options_are_checked(sft_bundle, night_files, tmp_path):
    folder = fresh_copy(sft_bundle, tmp_path)
    with pytest.raises(ConfigError, match="features"):
        headstart.update(folder, night_files["night2"], replay_store="features", **QUIET)
    with pytest.raises(ConfigError, match="store is 'none'"):
        headstart.update(folder, night_files["night2"], strategy="replay", replay_store="none", **QUIET)


def test_an_interrupted_update_leaves_version_1_and_resumes_to_the_same_adapter(sft_bundle, night_files, tmp_path,
                                                                                 monkeypatch):
    from headstart.engine import trainer

    whole = fresh_copy(sft_bundle, tmp_path, "whole")
    headstart.update(whole, night_files["night2"], strategy="l2sp", max_forgetting=None, **QUIET)
    folder = fresh_copy(sft_bundle, tmp_path, "killed")
    real_step, calls = trainer._Loop.step, []

    def dies_in_epoch_2(self, run, batch):  # 16 rows / 4 a batch: epoch 1 is 4 steps, then a checkpoint
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(self, run, batch)

    monkeypatch.setattr(trainer._Loop, "step", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        headstart.update(folder, night_files["night2"], strategy="l2sp", max_forgetting=None, **QUIET)
    monkeypatch.setattr(trainer._Loop, "step", real_step)
    assert headstart.load(folder).manifest.get("continual") is None  # still the fit's version
    lines: list[str] = []
    report = headstart.update(folder, night_files["night2"], strategy="l2sp", max_forgetting=None,
                              progress=False, log=lines.append)
    assert report["accepted"] and any("resumed from" in line for line in lines), lines
    a, b = adapter(whole / "v2"), adapter(folder / "v2")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not list(tmp_path.glob(".*checkpoint"))  # the finished update removed its checkpoints


def test_night_1_seeding_and_refs_that_are_gone(tmp_path):
    from types import SimpleNamespace

    from headstart.continual.generator_data import resolve_rows, row_key, seed_generator_memory
    from headstart.llm.data import split_holdout

    train = write_jsonl(tmp_path / "train.jsonl", rows(NIGHT1, 24))
    held = write_jsonl(tmp_path / "held.jsonl", rows(NIGHT2, 5))
    opts = SimpleNamespace(seed=0, log=lambda s: None)

    def fitted(eval_: str) -> SimpleNamespace:
        return SimpleNamespace(manifest={"task": "sft", "data": {"source": str(train), "eval": eval_}, "seed": 3,
                                         "method": {"config": {"eval_fraction": 0.25}}})

    memory = seed_generator_memory(fitted("25% of the training file"), "refs", opts, version=1)
    fit_train, fit_held = split_holdout(rows(NIGHT1, 24), 0.25, 3)  # the split the fit held out
    assert memory.nights[0].guard.keys == [row_key(r) for r in fit_held]
    assert sorted(memory.replay.keys) == sorted(row_key(r) for r in fit_train)
    assert resolve_rows(memory.nights[0].guard) == (fit_held, 0)
    memory = seed_generator_memory(fitted(str(held)), "refs", opts, version=1)  # fit(eval=FILE)
    assert len(memory.nights[0].guard) == 5 and len(memory.replay) == 24
    write_jsonl(train, rows(NIGHT1, 24)[:10])  # the user trimmed the file: 14 kept rows are gone
    assert len(resolve_rows(memory.replay)[0]) == 10 and resolve_rows(memory.replay)[1] == 14
    train.unlink()
    assert seed_generator_memory(fitted("x"), "refs", opts, version=1).nights == []
