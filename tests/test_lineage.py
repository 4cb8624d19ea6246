"""Versions of a specialist (bundle/lineage.py): a plain bundle becomes a lineage folder without changing
its files, every load follows the `current` pointer, a kill before the pointer switch leaves the previous
version current (and the next writer cleans up), rollback and diff, and the journal of learned files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import headstart
from headstart.bundle import commands, lineage as lineage_module
from headstart.bundle.format import read_manifest
from headstart.bundle.lineage import Lineage, resolve_bundle
from headstart.bundle.lineage_views import diff, history, rollback
from headstart.core.errors import BundleError

from bundle_fixtures import INPUTS, copy_of, one_line, probe_bundle, snapshot  # noqa: F401  (fixtures by name)

NIGHT = [{"sha256": "a" * 64, "path": "night1/train.csv", "examples": 60}]


def add_version(folder: Path, entry: dict | None = None, files=NIGHT, out: Path | None = None,
                change=None) -> int:
    """Commit the folder's current specialist again as a new version (what an update writes)."""
    lineage = Lineage.open(folder)
    staged = lineage.stage(out)
    headstart.load(folder).save(staged)
    (staged / "memory").mkdir()
    (staged / "memory" / "memory.json").write_text("{}")
    if change:
        path = staged / "manifest.json"
        m = json.loads(path.read_text())
        change(m)
        path.write_text(json.dumps(m))
    entry = entry or {"strategy": "replay", "scenario": "domain", "metrics": {"accuracy": 0.5},
                      "nights": [{"files": files, "examples": 60, "labels": {}}]}
    return lineage.commit(staged, entry, files, out=out)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in [*folder.iterdir(), *folder.parent.iterdir()] if p.name.startswith("."))


def test_plain_bundle_is_a_one_version_lineage(probe_bundle):
    lineage = Lineage.open(probe_bundle)
    assert (lineage.current, lineage.plain, lineage.current_folder) == (1, True, probe_bundle.absolute())
    assert resolve_bundle(probe_bundle) == probe_bundle
    rows = history(probe_bundle)
    assert len(rows) == 1 and rows[0]["version"] == 1 and rows[0]["current"] and rows[0]["accepted"]
    assert not (probe_bundle / "LINEAGE.json").exists()  # opening writes nothing


def test_first_commit_converts_and_keeps_v1_identical(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    before = snapshot(folder)
    staged = Lineage.open(folder).stage()
    assert staged.parent == folder.parent  # the plain bundle is swapped whole: its staging lives beside it
    headstart.load(folder).save(staged)
    assert Lineage.open(folder).commit(staged, {"strategy": "naive"}, NIGHT) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["LINEAGE.json", "journal.json", "v1", "v2"]
    assert snapshot(folder / "v1") == before
    assert hidden_leftovers(folder) == []
    record = json.loads((folder / "LINEAGE.json").read_text())
    assert record["current"] == 2 and [v["parent"] for v in record["versions"]] == [None, 1]
    assert record["versions"][1]["bundle_sha256"] == lineage_module.manifest_sha256(folder / "v2")
    original, v1 = commands.predict(probe_bundle, INPUTS), commands.predict(folder / "v1", INPUTS)
    assert v1 == original  # a version folder loads directly


def test_loads_and_commands_follow_the_pointer(probe_bundle, copy_of, tiny_text_csv):
    folder = copy_of(probe_bundle)
    add_version(folder)
    assert headstart.load(folder).folder == folder / "v2"
    assert read_manifest(folder) == read_manifest(folder / "v2")
    info = commands.info(folder)
    assert info["lineage"]["current"] == 2 and info["lineage"]["versions"] == [1, 2]
    assert "memory/memory.json" in info["files"] and "version    2 of 1, 2" in commands.describe(folder)
    assert commands.predict(folder, INPUTS) == commands.predict(folder / "v2", INPUTS)
    assert commands.evaluate(folder, tiny_text_csv)["accuracy"] == commands.evaluate(probe_bundle, tiny_text_csv)["accuracy"]


def test_kill_before_the_pointer_switch_keeps_the_previous_version(probe_bundle, copy_of, monkeypatch):
    folder = copy_of(probe_bundle)
    add_version(folder)
    real_write = lineage_module.atomic_write_text

    def killed_at_pointer(path, text):
        if Path(path).name == "LINEAGE.json":
            raise KeyboardInterrupt  # the process dies here: v3 and its journal rows are on disk, no pointer
        real_write(path, text)

    monkeypatch.setattr(lineage_module, "atomic_write_text", killed_at_pointer)
    other = [{"sha256": "b" * 64, "path": "night2/train.csv", "examples": 30}]
    with pytest.raises(KeyboardInterrupt):
        add_version(folder, files=other)
    monkeypatch.undo()
    assert (folder / "v3").is_dir() and "b" * 64 in json.loads((folder / "journal.json").read_text())["files"]
    assert headstart.load(folder).folder == folder / "v2"
    lineage = Lineage.open(folder)
    assert lineage.current == 2 and lineage.learned("a" * 64) and not lineage.learned("b" * 64)
    assert add_version(folder, files=other) == 4  # number 3 is never handed out again
    assert not (folder / "v3").exists() and Lineage.open(folder).learned("b" * 64)
    assert [r["version"] for r in history(folder)] == [1, 2, 4]


def test_kill_during_conversion_leaves_the_plain_bundle(probe_bundle, copy_of, monkeypatch):
    folder = copy_of(probe_bundle)
    before = snapshot(folder)
    lineage = Lineage.open(folder)
    staged = lineage.stage()
    headstart.load(folder).save(staged)

    def killed(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(lineage_module, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        lineage.commit(staged, {}, NIGHT)
    assert snapshot(folder) == before and Lineage.open(folder).plain
    assert commands.predict(folder, INPUTS) == commands.predict(probe_bundle, INPUTS)


def test_dead_writers_staging_is_removed_by_the_next_writer(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    add_version(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that no longer runs
    inside, beside = folder / f".stage-{dead}-x1", folder.parent / f".{folder.name}.stage-{dead}-x2"
    for leftover in (inside, beside):
        leftover.mkdir()
        (leftover / "manifest.json").write_text("{}")
    staged = Lineage.open(folder).stage()
    assert staged.parent == folder and not inside.exists() and not beside.exists()


def test_rollback_switches_the_pointer_and_the_next_update_starts_there(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    add_version(folder)
    assert rollback(folder, 1) == 1
    assert headstart.load(folder).folder == folder / "v1"
    lineage = Lineage.open(folder)
    assert not lineage.learned("a" * 64)  # v2 learned it, but v1 is current: that night teaches again
    event = lineage.record["events"][0]["rollback"]
    assert (event["from"], event["to"]) == (2, 1)
    with pytest.raises(BundleError) as e:
        rollback(folder, 7)
    assert "versions: 1, 2" in one_line(e)
    assert add_version(folder) == 3
    assert Lineage.open(folder).entry(3)["parent"] == 1
    assert [(r["version"], r["current"]) for r in history(folder)] == [(1, False), (2, False), (3, True)]


def test_diff_reports_labels_metrics_guards_and_data(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    classes = read_manifest(folder)["heads"]["default"]["classes"]

    def grow(m):  # a class-incremental version: one label more (the file is only read, not loaded)
        m["heads"]["default"]["classes"] = m["classes"] = [*classes[1:], "refund"]

    entry = {"strategy": "replay+lwf", "scenario": "class", "metrics": {"accuracy": 0.9, "macro_f1": 0.8},
             "guards": {"night1": {"before": 90.0, "after": 89.5}}, "nights": [{"examples": 60}]}
    add_version(folder, entry, change=grow)
    accuracy_v1 = Lineage.open(folder).entry(1)["metrics"]["accuracy"]
    d = diff(folder, 1, 2)
    assert d["labels"] == {"added": ["refund"], "removed": [classes[0]]}
    assert d["metrics"]["accuracy"]["change"] == pytest.approx(0.9 - accuracy_v1)
    assert d["guards"]["b"] == entry["guards"] and (d["strategy"], d["scenario"]) == ("replay+lwf", "class")
    assert d["data"] == entry["nights"] and history(folder)[1]["examples"] == 60


def test_rejected_attempts_are_recorded_without_a_folder(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    add_version(folder)
    Lineage.open(folder).reject({"strategy": "naive", "guards": {"night1": {"drop": 5.0}}}, why="forgot night 1")
    rows = history(folder)
    assert rows[-1]["accepted"] is False and rows[-1]["why"] == "forgot night 1"
    assert Lineage.open(folder).current == 2 and sorted(p.name for p in folder.glob("v*")) == ["v1", "v2"]


def test_commit_to_another_folder_copies_the_lineage(probe_bundle, copy_of, tmp_path):
    folder = copy_of(probe_bundle)
    before = snapshot(folder)
    out = tmp_path / "updated"
    assert add_version(folder, out=out) == 2
    assert snapshot(folder) == before  # the source stays a plain bundle
    assert headstart.load(out).folder == out / "v2" and snapshot(out / "v1") == before
    assert (out / "v1" / "manifest.json").stat().st_ino == (folder / "manifest.json").stat().st_ino  # linked
    assert add_version(out, out=tmp_path / "again") == 3
    assert sorted(p.name for p in (tmp_path / "again").glob("v*")) == ["v1", "v2", "v3"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(BundleError) as e:
        Lineage.open(out).stage(stranger)
    assert "neither a bundle nor a lineage" in one_line(e)


def test_a_tampered_lineage_record_is_one_bundle_error(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    add_version(folder)
    record = json.loads((folder / "LINEAGE.json").read_text())
    record["versions"][1]["folder"] = "../../elsewhere"
    (folder / "LINEAGE.json").write_text(json.dumps(record))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "folder" in one_line(e)


def test_a_version_folder_is_not_a_lineage_of_its_own(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    add_version(folder)
    with pytest.raises(BundleError) as e:
        Lineage.open(folder / "v1")
    assert "rollback to 1" in one_line(e)


def test_an_orphan_version_without_journal_rows_is_numbered_past_then_removed(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    add_version(folder)
    shutil.copytree(folder / "v2", folder / "v3")  # a kill right after the rename, before journal and pointer
    assert headstart.load(folder).folder == folder / "v2"
    assert add_version(folder) == 4 and not (folder / "v3").exists()
