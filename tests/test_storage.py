"""core.storage: the one atomic write (files and folders) and its one recovery rule.

A kill -9 runs no cleanup, so it is simulated by raising at the chosen rename and turning every later
rename and delete into a no-op: the disk is left exactly as a killed process would leave it.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from headstart.core import storage
from headstart.core.storage import (atomic_dir, atomic_write_bytes, atomic_write_text, discard_dir,
                                    recover_interrupted_swap)


class Killed(BaseException):
    pass


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _write(folder, text):
    with atomic_dir(folder) as tmp:
        (tmp / "content.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "more.txt").write_text(text * 2)


def _read(folder):
    return (folder / "content.txt").read_text(), (folder / "sub" / "more.txt").read_text()


def _dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


@pytest.fixture
def kill_at(monkeypatch):
    """kill_at(n): the n-th rename inside storage raises Killed; afterwards nothing is renamed or deleted.

    The doomed write runs under the pid of a process that has exited, as a killed writer's leftovers would.
    """
    def arm(n: int):
        real_replace, real_remove, state = storage.os.replace, storage._remove, {"calls": 0, "dead": False}
        real_getpid, dead_pid = storage.os.getpid, _dead_pid()

        def replace(src, dst):
            if state["dead"]:
                return
            state["calls"] += 1
            if state["calls"] == n:
                state["dead"] = True
                raise Killed
            real_replace(src, dst)

        def remove(path):
            if not state["dead"]:
                real_remove(path)

        monkeypatch.setattr(storage.os, "replace", replace)
        monkeypatch.setattr(storage, "_remove", remove)
        monkeypatch.setattr(storage.os, "getpid", lambda: dead_pid)
        return lambda: (monkeypatch.setattr(storage.os, "replace", real_replace),
                        monkeypatch.setattr(storage, "_remove", real_remove),
                        monkeypatch.setattr(storage.os, "getpid", real_getpid))
    return arm


def test_atomic_dir_writes_and_replaces_without_leftovers(tmp_path):
    folder = tmp_path / "out"
    _write(folder, "one")
    assert _read(folder) == ("one", "oneone")
    _write(folder, "two")
    assert _read(folder) == ("two", "twotwo")
    assert _siblings(folder) == []


def test_atomic_dir_replaces_a_file_of_the_same_name(tmp_path):
    folder = tmp_path / "out"
    folder.write_text("a file")
    _write(folder, "one")
    assert _read(folder) == ("one", "oneone") and _siblings(folder) == []


def test_failure_inside_the_block_leaves_the_old_folder_untouched(tmp_path):
    folder = tmp_path / "out"
    _write(folder, "one")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "content.txt").write_text("half")
            raise RuntimeError("boom")
    assert _read(folder) == ("one", "oneone") and _siblings(folder) == []


def test_failure_on_first_write_leaves_nothing(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(folder):
            raise RuntimeError("boom")
    assert not folder.exists() and _siblings(folder) == []


def test_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    _write(folder, "one")
    real_replace, calls = os.replace, []

    def replace(src, dst):  # step 2 (tmp -> folder) fails with an ordinary error
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk on fire")
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(OSError, match="disk on fire"):
        _write(folder, "two")
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert _read(folder) == ("one", "oneone") and _siblings(folder) == []


def test_kill_after_moving_the_old_folder_aside_is_recovered(tmp_path, kill_at):
    folder = tmp_path / "out"
    _write(folder, "one")
    revive = kill_at(2)  # step 1 done, step 2 never happens
    with pytest.raises(Killed):
        _write(folder, "two")
    revive()
    assert not folder.exists()  # what a reader finds right after the kill ...
    recover_interrupted_swap(folder)
    assert _read(folder) == ("one", "oneone")  # ... and the previous version is back
    _write(folder, "three")  # the next writer is not disturbed by the kill's leftovers
    assert _read(folder) == ("three", "threethree") and _siblings(folder) == []


def test_kill_after_the_new_folder_is_in_place_keeps_the_new_one(tmp_path, kill_at):
    folder = tmp_path / "out"
    _write(folder, "one")
    revive = kill_at(3)  # steps 1 and 2 done, the old folder is still there
    with pytest.raises(Killed):
        _write(folder, "two")
    revive()
    assert any(".old-" in name for name in _siblings(folder))
    recover_interrupted_swap(folder)
    assert _read(folder) == ("two", "twotwo") and _siblings(folder) == []


def test_kill_while_deleting_the_old_folder_never_leaves_a_partial_old(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    _write(folder, "one")
    # Step 3 renames old -> tmp before deleting: a kill during the delete leaves a partial `tmp-*`, which
    # recovery must never restore, even when `folder` itself has gone meanwhile.
    monkeypatch.setattr(storage, "_remove", lambda path: (path / "content.txt").unlink(missing_ok=True))
    _write(folder, "two")
    monkeypatch.undo()
    assert not any(".old-" in name for name in _siblings(folder))
    storage._remove(folder)
    recover_interrupted_swap(folder)
    assert not folder.exists()


def test_leftover_tmp_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    folder = tmp_path / "out"
    _write(folder, "one")
    stale = folder.with_name(f".out.tmp-{_dead_pid()}-abc123")
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"x")
    live = folder.with_name(f".out.tmp-{os.getppid()}-abc123")  # our parent: certainly alive
    live.mkdir()
    recover_interrupted_swap(folder)
    assert not stale.exists() and live.exists()


def test_replace_false_keeps_a_folder_another_process_finished_first(tmp_path):
    folder = tmp_path / "cache-entry"
    with atomic_dir(folder, replace=False) as tmp:
        (tmp / "content.txt").write_text("ours")
        _write(folder, "theirs")  # finishes while we are still writing
    assert (folder / "content.txt").read_text() == "theirs" and _siblings(folder) == []


def test_atomic_write_text_and_bytes(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_text(path, "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"

    def broken(src, dst):
        raise OSError("no")

    monkeypatch.setattr(storage.os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_bytes() == b"\x00\x01" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_discard_dir_removes_the_folder_and_its_leftovers(tmp_path, kill_at):
    folder = tmp_path / "ckpt"
    _write(folder, "one")
    revive = kill_at(3)  # new folder in place, old one and the killed writer's tmp name left
    with pytest.raises(Killed):
        _write(folder, "two")
    revive()
    (tmp_path / "keep").mkdir()
    discard_dir(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    discard_dir(tmp_path / "never-written")  # nothing there: no error


def test_a_real_kill_9_inside_the_block_leaves_the_old_folder_and_no_leftover(tmp_path):
    import signal
    import sys

    folder = tmp_path / "out"
    _write(folder, "one")
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from headstart.core.storage import atomic_dir
with atomic_dir({str(folder)!r}) as tmp:
    (tmp / "content.txt").write_text("half")
    print("ready", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert any(".tmp-" in name for name in _siblings(folder))  # what the killed writer left
    recover_interrupted_swap(folder)
    assert _read(folder) == ("one", "oneone") and _siblings(folder) == []


def test_a_folder_written_atomically_gets_ordinary_permissions(tmp_path):
    from headstart.core.storage import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "bundle") as tmp:
            (tmp / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755, "not the private 0700 of a temp dir"
