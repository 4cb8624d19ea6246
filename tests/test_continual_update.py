"""`headstart.update`: a specialist learns night after night, as versions, guarded against forgetting.

Code paths on the tiny random bases (fast); `test_real_*` at the bottom runs the real MiniLM on banking77.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import headstart
from headstart.continual.memory import ExampleSet, Memory
from headstart.core.errors import ConfigError

from conftest import REPO, text_rows, write_table

QUIET = dict(progress=False, log=lambda s: None)


def night_rows(classes, n, seed):
    return text_rows(n, seed=seed, classes=classes)


@pytest.fixture
def probe_bundle(tmp_path) -> Path:
    """A probe on tiny-text fitted on food + sport (its data stays on disk: night 1's guard comes from it)."""
    data = tmp_path / "night1"
    write_table(data / "train.csv", night_rows(("food", "sport"), 40, 0))
    write_table(data / "test.csv", night_rows(("food", "sport"), 20, 1))
    headstart.fit(data, base="tiny-text", method="probe", out=tmp_path / "spec", **QUIET)
    return tmp_path / "spec"


def test_class_incremental_night_grows_the_head_and_keeps_the_old_classes(probe_bundle, tmp_path):
    night2 = write_table(tmp_path / "tonight.csv", night_rows(("tech", "food", "sport"), 45, 2))
    # The tiny random base separates its classes poorly: the guard measures here, it does not judge.
    report = headstart.update(probe_bundle, night2, max_forgetting=None, **QUIET)
    assert report["accepted"] and report["version"] == 2 and report["guards"]["1"]["drop"] is not None
    assert report["scenario"] == "class" and report["new_labels"] == ["tech"]
    assert report["strategy"] == "replay" and "new labels" in report["why"]
    assert report["held_back"] > 0 and report["replayed"] > 0
    assert set(report["guards"]) == {"1"}  # night 1's guard: the split the fit held out
    spec = headstart.load(probe_bundle)
    assert spec.classes == ["food", "sport", "tech"]
    assert spec.predict(["laptop code server"]) == ["tech"]
    assert (probe_bundle / "v1" / "manifest.json").is_file() and (probe_bundle / "v2" / "memory").is_dir()
    rows = headstart.history(probe_bundle)
    assert [r["version"] for r in rows] == [1, 2] and rows[1]["current"]
    assert headstart.diff(probe_bundle, 1, 2)["labels"]["added"] == ["tech"]
    with pytest.raises(ConfigError, match="versions of an updated specialist"):
        headstart.fit(night2, base="tiny-text", method="probe", out=probe_bundle, **QUIET)
    assert headstart.rollback(probe_bundle, 1) == 1
    assert headstart.load(probe_bundle).classes == ["food", "sport"]


def test_the_same_night_twice_learns_nothing_new(probe_bundle, tmp_path):
    night2 = write_table(tmp_path / "tonight.csv", night_rows(("food", "sport"), 30, 3))
    assert headstart.update(probe_bundle, night2, **QUIET)["version"] == 2
    again = headstart.update(probe_bundle, night2, **QUIET)
    assert again["nothing_new"] and again["version"] == 2 and again["already_learned"] == 30
    # A file with some new rows: only those are learned.
    more = write_table(tmp_path / "more.csv", night_rows(("food", "sport"), 30, 3) + night_rows(("food", "sport"), 12, 4))
    third = headstart.update(probe_bundle, more, **QUIET)
    assert third["examples"] == 12 and third["already_learned"] == 30 and third["version"] == 3


def test_watch_learns_only_files_that_arrived(probe_bundle, tmp_path):
    inbox = tmp_path / "inbox"
    write_table(inbox / "a.csv", night_rows(("food", "sport"), 20, 5))
    first = headstart.update(probe_bundle, watch=inbox, **QUIET)
    assert first["examples"] == 20
    write_table(inbox / "b.csv", night_rows(("food", "sport"), 16, 6))
    second = headstart.update(probe_bundle, watch=inbox, **QUIET)
    assert second["examples"] == 16 and second["already_learned"] == 20 and second["version"] == 3


def test_a_night_that_forgets_is_retried_then_rejected_and_the_current_version_stays(probe_bundle, tmp_path):
    # Tonight's labels contradict night 1's (food and sport swapped): learning them must forget night 1.
    swapped = [(t, {"food": "sport", "sport": "food"}[y]) for t, y in night_rows(("food", "sport"), 80, 7)]
    night2 = write_table(tmp_path / "tonight.csv", swapped)
    lines = []
    report = headstart.update(probe_bundle, night2, strategy="naive", max_forgetting=0.0, progress=False,
                              log=lines.append)
    assert not report["accepted"] and report["retried"] and report["strategy"] == "l2sp"
    assert "night 1" in report["why_rejected"] and any("retrying once" in line for line in lines)
    assert report["version"] == 1
    spec = headstart.load(probe_bundle)
    assert spec.classes == ["food", "sport"]  # still the version before the night
    assert not (probe_bundle / "v2").exists()


def test_default_store_keeps_no_example_content(tmp_path, probe_bundle):
    texts = night_rows(("food", "sport", "tech"), 45, 9)
    night2 = write_table(tmp_path / "tonight.csv", texts)
    assert headstart.update(probe_bundle, night2, **QUIET)["store"] == "features"
    blob = b"".join(p.read_bytes() for p in probe_bundle.rglob("*") if p.is_file())
    leaked = [t for t, _ in texts if t.encode() in blob]
    assert not leaked, f"raw text in the lineage: {leaked[:3]}"
    # A memory does not change kind behind the user's back; `none` drops it.
    night3 = write_table(tmp_path / "three.csv", night_rows(("food", "sport", "tech"), 45, 10))
    with pytest.raises(ConfigError, match="memory keeps 'features'"):
        headstart.update(probe_bundle, night3, replay_store="raw", **QUIET)
    headstart.update(probe_bundle, night3, replay_store="none", max_forgetting=None, **QUIET)
    memory = json.loads((probe_bundle / "v3" / "memory" / "memory.json").read_text())
    assert memory["store"] == "none" and not memory["nights"] and not memory["replay"]["labels"]


def test_raw_store_is_opt_in_and_keeps_the_examples(tmp_path):
    data = tmp_path / "night1.csv"
    write_table(data, night_rows(("food", "sport"), 40, 22))
    headstart.fit(data, base="tiny-text", method="probe", out=tmp_path / "spec", **QUIET)
    night = write_table(tmp_path / "n2.csv", night_rows(("food", "sport", "tech"), 45, 23))
    report = headstart.update(tmp_path / "spec", night, replay_store="raw", **QUIET)
    memory = json.loads((tmp_path / "spec" / "v2" / "memory" / "memory.json").read_text())
    assert report["store"] == "raw" and memory["store"] == "raw" and memory["replay"]["raw"]


def test_lora_specialist_updates_with_refs_and_no_text_in_the_bundle(tmp_path):
    data = tmp_path / "night1.csv"
    write_table(data, night_rows(("food", "sport"), 60, 11))
    headstart.fit(data, base="tiny-text", method="lora", out=tmp_path / "spec", epochs=2, **QUIET)
    rows = night_rows(("food", "sport"), 40, 12)
    night2 = write_table(tmp_path / "tonight.csv", rows)
    report = headstart.update(tmp_path / "spec", night2, strategy="replay+l2sp", **QUIET)
    assert report["accepted"] and report["store"] == "refs" and report["replayed"] > 0
    v1 = headstart.load(tmp_path / "spec" / "v1")
    v2 = headstart.load(tmp_path / "spec")
    a = {n: p for n, p in v1.model.named_parameters() if "lora_B" in n}
    b = {n: p for n, p in v2.model.named_parameters() if "lora_B" in n}
    assert a and any(not torch.equal(a[n], b[n]) for n in a)  # the adapter learned
    blob = b"".join(p.read_bytes() for p in (tmp_path / "spec").rglob("*") if p.is_file())
    assert not [t for t, _ in rows if t.encode() in blob]
    # The refs point at the user's file: gone, the replay drops those examples and says how many.
    data.unlink()
    third = headstart.update(tmp_path / "spec", write_table(tmp_path / "n3.csv", night_rows(("food", "sport"), 20, 13)),
                             strategy="replay", max_forgetting=None, **QUIET)
    assert third["memory_dropped"] > 0


def test_fresh_adapter_per_night_keeps_the_old_adapter_and_grows_the_rank(tmp_path):
    data = tmp_path / "night1.csv"
    write_table(data, night_rows(("food", "sport"), 40, 24))
    headstart.fit(data, base="tiny-text", method="lora", out=tmp_path / "spec", epochs=1, r=4, **QUIET)
    night = write_table(tmp_path / "n2.csv", night_rows(("food", "sport", "tech"), 45, 25))
    report = headstart.update(tmp_path / "spec", night, fresh_adapter=True, strategy="replay", max_forgetting=None,
                              **QUIET)
    assert report["accepted"]
    config = json.loads((tmp_path / "spec" / "v2" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8  # 4 + 4: the old adapter and tonight's, summed exactly
    spec = headstart.load(tmp_path / "spec")
    assert spec.classes == ["food", "sport", "tech"] and len(spec.predict(["laptop code server"])) == 1
    with pytest.raises(ConfigError, match="does not combine with ewc"):
        headstart.update(tmp_path / "spec", write_table(tmp_path / "n3.csv", night_rows(("food",), 20, 26)),
                         fresh_adapter=True, strategy="ewc", **QUIET)


def test_ewc_carries_an_online_fisher_from_version_to_version(probe_bundle, tmp_path):
    for night, seed in ((2, 14), (3, 15)):
        path = write_table(tmp_path / f"n{night}.csv", night_rows(("food", "sport"), 30, seed))
        assert headstart.update(probe_bundle, path, strategy="ewc", max_forgetting=None, **QUIET)["accepted"]
    f2 = Memory.read(probe_bundle / "v2").fisher
    f3 = Memory.read(probe_bundle / "v3").fisher
    assert set(f2) == {"head.weight", "head.bias"}
    assert torch.all(f3["head.weight"] >= 0.9 * f2["head.weight"] - 1e-6)  # decay 0.9 + tonight's


def test_unlabelled_night_learns_from_its_own_confident_guesses(probe_bundle, tmp_path):
    texts = [t for t, _ in night_rows(("food", "sport"), 30, 16)]
    night = tmp_path / "unlabelled.csv"
    write_table(night, [(t,) for t in texts], columns=("text",))
    report = headstart.update(probe_bundle, night, unlabelled=True, **QUIET)
    assert report["scenario"] == "unlabelled" and report["strategy"] == "replay+l2sp"
    assert report["accepted"] and report["held_back"] == 0
    assert 0 < report["trained_on"] - report["replayed"] <= 30  # its confident guesses, plus the replayed examples


def test_bad_requests_are_one_line_errors(probe_bundle, tmp_path):
    with pytest.raises(ConfigError, match="nothing to learn"):
        headstart.update(probe_bundle, **QUIET)
    night = write_table(tmp_path / "n.csv", night_rows(("food", "sport"), 20, 17))
    with pytest.raises(ConfigError, match="unknown strategy"):
        headstart.update(probe_bundle, night, strategy="forget", **QUIET)
    with pytest.raises(ConfigError, match="replay store"):
        headstart.update(probe_bundle, night, replay_store="cloud", **QUIET)


def test_reservoir_is_bounded_and_class_balanced():
    import random

    memory = Memory("refs")
    rng = random.Random(0)
    for night in range(4):
        labels = [f"c{night}"] * 300 + ["c0"] * 100
        memory.offer(ExampleSet(labels, [f"k{night}-{i}" for i in range(400)], refs=["f"] * 400), 100, rng)
    counts = {c: memory.replay.labels.count(c) for c in set(memory.replay.labels)}
    assert len(memory.replay) <= 100 and set(counts) == {"c0", "c1", "c2", "c3"}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert memory.seen["c0"] == 400 + 100 * 3  # night 0 offers 400 of c0, each later night 100


def _update_cmd(bundle: Path, night: Path) -> list[str]:
    return [sys.executable, "-c", "import headstart, json; r = headstart.update(%r, %r, progress=False); "
            "print('REPORT' + json.dumps(r, default=str))" % (str(bundle), str(night))]


def test_kill_mid_update_leaves_the_current_version_and_the_rerun_resumes(tmp_path):
    data = tmp_path / "night1.csv"
    write_table(data, night_rows(("food", "sport"), 40, 18))
    headstart.fit(data, base="tiny-text", method="lora", out=tmp_path / "spec", epochs=1, **QUIET)
    night2 = write_table(tmp_path / "tonight.csv", night_rows(("food", "sport"), 400, 19))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(_update_cmd(tmp_path / "spec", night2), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob(".spec.update-*.checkpoint/state.json")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert headstart.history(tmp_path / "spec")[-1]["version"] == 1  # untouched: still the plain bundle
    assert headstart.load(tmp_path / "spec").manifest["method"]["name"] == "lora"
    done = subprocess.run(_update_cmd(tmp_path / "spec", night2), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout + done.stderr
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    assert report["version"] == 2
    assert not list(tmp_path.glob(".spec.update-*"))  # its checkpoints are spent


def test_update_runs_with_no_network_at_all(probe_bundle, tmp_path):
    night = write_table(tmp_path / "n.csv", night_rows(("food", "sport", "tech"), 30, 20))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode == 0:  # a network namespace with no interface at all
        cmd = ["unshare", "-rn", *_update_cmd(probe_bundle, night)]
    else:  # no user namespaces here: every socket connection fails instead
        guard = ("import socket\ndef refuse(*a, **k): raise OSError('network use in update')\n"
                 "socket.socket.connect = refuse\nsocket.create_connection = refuse\n")
        cmd = [sys.executable, "-c", guard + _update_cmd(probe_bundle, night)[2]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.split("REPORT", 1)[1])["accepted"]


def test_cli_update_prints_one_line_and_history(probe_bundle, tmp_path):
    from conftest import headstart_cli

    night = write_table(tmp_path / "n.csv", night_rows(("food", "sport", "tech"), 30, 21))
    done = headstart_cli("update", probe_bundle, night)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "version 2 accepted" in done.stdout and "new labels tech" in done.stdout
    assert done.stderr.strip() == ""  # quiet for cron: no progress bars when stderr is not a terminal
    hist = headstart_cli("history", probe_bundle, "--json")
    assert [r["version"] for r in json.loads(hist.stdout.strip().splitlines()[-1])] == [1, 2]
    bad = headstart_cli("rollback", probe_bundle, "--to", "7")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "7" in bad.stderr


@pytest.mark.real
def test_real_class_incremental_banking_replay_keeps_what_naive_forgets(data_root, tmp_path):
    import csv

    rows = list(csv.DictReader(open(data_root / "banking77" / "train.csv")))
    labels = sorted({r["label"] for r in rows})

    def night(names, path):
        picked = [(r["text"], r["label"]) for name in names for r in [x for x in rows if x["label"] == name][:20]]
        return write_table(path, picked)

    first = night(labels[:8], tmp_path / "n1.csv")
    second = night(labels[8:12], tmp_path / "n2.csv")
    headstart.fit(first, base="minilm-l6", method="probe", out=tmp_path / "a", **QUIET)
    headstart.fit(first, base="minilm-l6", method="probe", out=tmp_path / "b", **QUIET)
    naive = headstart.update(tmp_path / "a", second, strategy="naive", max_forgetting=None, **QUIET)
    guarded = headstart.update(tmp_path / "b", second, **QUIET)
    assert naive["guards"]["1"]["drop"] > 20  # the baseline forgets the old intents
    assert guarded["accepted"] and guarded["guards"]["1"]["drop"] <= 2.0
    assert guarded["night_accuracy"] >= 70
