"""The local hub (headstart.hub): add, list, search, show, pull (sha256-verified), remove, the index that
skips junk, names that cannot escape the hub, the Hugging Face Hub calls (faked: no network), and the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean_error
from conftest import headstart_cli as headstart_cmd

import headstart
from headstart import hub
from headstart.core.errors import ConfigError, HeadstartError
from headstart.hub import HubError

QUIET = {"progress": False, "log": lambda _: None}


@pytest.fixture(scope="module")
def bundles(tiny_text_csv, tiny_image_folder, tmp_path_factory) -> dict[str, Path]:
    """A tiny text classifier and a tiny image classifier, fitted once for the module."""
    root = tmp_path_factory.mktemp("hub-bundles")
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", out=root / "words", **QUIET)
    headstart.fit(tiny_image_folder, base="tiny-image", method="probe", out=root / "colours", **QUIET)
    return {"text": root / "words", "image": root / "colours"}


@pytest.fixture
def filled(bundles, tmp_path) -> Path:
    """A hub holding both bundles."""
    folder = tmp_path / "hub"
    hub.add(bundles["text"], folder)
    hub.add(bundles["image"], folder)
    return folder


def test_add_indexes_the_bundle_with_its_facts_and_file_hashes(bundles, tmp_path):
    entry = hub.add(bundles["text"], tmp_path / "hub", name="trec-like")
    assert entry["name"] == "trec-like" and entry["task"] == "text-classification"
    assert entry["kind"] == "classifier" and entry["base"]["name"] == "tiny-text" and entry["method"] == "probe"
    assert set(entry["labels"]) == set(json.loads((bundles["text"] / "manifest.json").read_text())["classes"])
    assert 0 <= entry["metrics"]["accuracy"] <= 1 and entry["skipped"] == 0
    index = json.loads((tmp_path / "hub" / "index.json").read_text())
    files = index["entries"][0]["files"]
    assert {"manifest.json", "README.md"} <= set(files)
    original = {p.relative_to(bundles["text"]).as_posix() for p in bundles["text"].rglob("*") if p.is_file()}
    assert set(files) == original
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())
    assert (tmp_path / "hub" / "trec-like" / "manifest.json").read_bytes() == \
        (bundles["text"] / "manifest.json").read_bytes()


def test_add_refuses_an_existing_name_unless_replace(bundles, filled):
    with pytest.raises(HubError, match="already in this hub"):
        hub.add(bundles["text"], filled)
    assert hub.add(bundles["image"], filled, name="words", replace=True)["task"] == "image-classification"
    assert {e["name"]: e["task"] for e in hub.list_entries(filled)}["words"] == "image-classification"


def test_add_refuses_what_is_not_a_bundle_before_copying(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(HeadstartError, match="manifest"):
        hub.add(tmp_path / "junk", tmp_path / "hub")
    assert not (tmp_path / "hub" / "junk").exists()
    with pytest.raises(HubError, match="no such bundle"):
        hub.add(tmp_path / "nowhere", tmp_path / "hub")


def test_a_lineage_folder_adds_its_current_version(bundles, tmp_path):
    from headstart.bundle.lineage import Lineage

    folder = tmp_path / "intents"
    shutil.copytree(bundles["text"], folder)
    lineage = Lineage.open(folder)
    staged = lineage.stage()
    shutil.copytree(bundles["image"], staged, dirs_exist_ok=True)  # "version 2" is the image bundle
    assert lineage.commit(staged, {"strategy": "test"}) == 2
    entry = hub.add(folder, tmp_path / "hub")
    assert entry["name"] == "intents" and entry["task"] == "image-classification"
    assert not (tmp_path / "hub" / "intents" / "LINEAGE.json").exists()


@pytest.mark.parametrize("bad", ["../up", "a/b", ".hidden", "-dash", "", "x" * 101, "sp ace", "..", "a\\b"])
def test_bad_names_are_refused(bundles, filled, tmp_path, bad):
    with pytest.raises(HubError, match="not a valid specialist name"):
        hub.add(bundles["text"], filled, name=bad)
    for call in (lambda: hub.show(bad, filled), lambda: hub.remove(bad, filled),
                 lambda: hub.pull(bad, filled, tmp_path / "out")):
        with pytest.raises(HubError, match="not a valid specialist name"):
            call()
    assert not (tmp_path / "out").exists() and not (filled.parent / "up").exists()


def test_list_and_search_by_task_base_label_metric_and_text(filled):
    assert {e["name"] for e in hub.list_entries(filled)} == {"words", "colours"}
    names = lambda **kw: [e["name"] for e in hub.search(filled, **kw)]  # noqa: E731
    assert names(task="image-classification") == ["colours"]
    assert names(task="text-classification") == ["words"] == names(task="feature-extraction")
    assert names(task="text-generation") == []
    assert names(base="tiny-image") == ["colours"] and names(base="TINY-TEXT") == ["words"]
    sha = hub.show("colours", filled)["base"]["sha256"]
    assert names(base=sha[:12]) == ["colours"]
    image_label = hub.show("colours", filled)["labels"][0]
    assert names(label=image_label.upper()) == ["colours"] and names(label="no-such-label") == []
    both = hub.search(filled, metric="accuracy")
    assert [e["metrics"]["accuracy"] for e in both] == sorted((e["metrics"]["accuracy"] for e in both), reverse=True)
    assert names(metric="accuracy", min_value=1.01) == [] and len(names(metric="accuracy", min_value=0.0)) == 2
    assert names(metric="no_such_metric") == []
    assert names(text="tiny-image probe") == ["colours"]
    assert names(task="image-classification", base="tiny-text") == []


def test_search_refuses_unknown_tasks_and_a_bare_min_value(filled):
    with pytest.raises(ConfigError, match="unknown task"):
        hub.search(filled, task="classify")
    with pytest.raises(ConfigError, match="needs a metric"):
        hub.search(filled, min_value=0.5)


def test_show_has_facts_metrics_card_and_hashed_files(filled):
    d = hub.show("words", filled)
    assert d["task"] == "text-classification" and d["method_config"] and "accuracy" in d["metrics"]
    assert d["card"].startswith("---\n") and "pipeline_tag: text-classification" in d["card"]
    assert Path(d["path"]).is_dir() and all(len(f["sha256"]) == 64 for f in d["files"].values())
    with pytest.raises(HubError, match="no specialist 'nope'"):
        hub.show("nope", filled)


def test_pull_copies_every_file_and_verifies_it(filled, tmp_path):
    out = hub.pull("words", filled, tmp_path / "pulled")
    listed = hub.show("words", filled)["files"]
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == set(listed)
    spec = headstart.load(out)  # the pulled bundle loads and predicts
    assert spec.predict(["anything at all"])[0]
    with pytest.raises(HubError, match="already exists"):
        hub.pull("words", filled, out)
    assert hub.pull("words", filled, out, replace=True) == out


@pytest.mark.parametrize("file", ["trained.safetensors", "manifest.json"])
def test_a_tampered_byte_refuses_the_pull_and_leaves_nothing(filled, tmp_path, file):
    path = filled / "words" / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if file != "manifest.json":
        hub.rebuild_index(filled)  # a rebuild keeps the hashes recorded at `add`: the tamper is still caught
    with pytest.raises(HubError, match=f"{file}.*altered; pull refused"):
        hub.pull("words", filled, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no half-written leftovers


def test_rehash_accepts_what_is_on_disk_now(filled, tmp_path):
    card = filled / "words" / "README.md"
    card.write_text(card.read_text() + "\nEdited in the hub.\n")
    with pytest.raises(HubError, match="README.md.*altered"):
        hub.pull("words", filled, tmp_path / "out")
    hub.rebuild_index(filled, rehash=True)
    assert (hub.pull("words", filled, tmp_path / "out") / "README.md").read_text().endswith("Edited in the hub.\n")


def test_a_missing_file_refuses_the_pull(filled, tmp_path):
    (filled / "words" / "README.md").unlink()
    hub.rebuild_index(filled)
    with pytest.raises(HubError, match="README.md"):
        hub.pull("words", filled, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_index_cannot_point_a_pull_outside_the_bundle(filled, tmp_path):
    index = json.loads((filled / "index.json").read_text())
    index["entries"][0]["files"]["../../secret"] = {"sha256": "0" * 64, "size": 1}
    (filled / "index.json").write_text(json.dumps(index))
    with pytest.raises(HubError, match="outside the bundle"):
        hub.pull(index["entries"][0]["name"], filled, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remove_deletes_the_folder_and_the_entry(filled):
    assert hub.remove("words", filled)["name"] == "words"
    assert not (filled / "words").exists() and [e["name"] for e in hub.list_entries(filled)] == ["colours"]
    assert [p for p in filled.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(HubError, match="no specialist 'words'"):
        hub.remove("words", filled)


def test_junk_folders_are_skipped_and_counted_never_a_crash(bundles, filled):
    (filled / "junk").mkdir()
    (filled / "junk" / "notes.txt").write_text("not a bundle")
    (filled / "broken").mkdir()
    (filled / "broken" / "manifest.json").write_text('{"format": "headstart-bundle"}')
    (filled / "bad name").mkdir()
    index = hub.rebuild_index(filled)
    assert {s["folder"] for s in index["skipped"]} == {"junk", "broken", "bad name"}
    assert {e["name"] for e in index["entries"]} == {"words", "colours"}
    assert hub.add(bundles["text"], filled, name="again")["skipped"] == 3
    assert {e["name"] for e in hub.entries(filled)} == {"words", "colours", "again"}


def test_a_kill_mid_replace_is_undone_on_the_next_read(filled):
    (filled / "words").rename(filled / ".words.old-999999-x")  # moved aside, the new copy never swapped in
    (filled / ".words.tmp-999999-y").mkdir()  # a dead writer's half copy
    assert {e["name"] for e in hub.list_entries(filled)} == {"words", "colours"}
    assert (filled / "words" / "manifest.json").is_file()
    assert [p.name for p in filled.iterdir() if p.name.startswith(".")] == []


def test_entries_for_the_server_and_a_hand_copied_bundle(bundles, filled):
    shutil.copytree(bundles["text"], filled / "by-hand")  # the index notices a folder it does not list
    rows = {e["name"]: e for e in hub.entries(filled)}
    assert set(rows) == {"words", "colours", "by-hand"}
    assert all(Path(e["path"]).is_absolute() and (Path(e["path"]) / "manifest.json").is_file() for e in rows.values())
    assert rows["colours"]["task"] == "image-classification" and rows["words"]["kind"] == "classifier"
    (filled / "index.json").write_text("{torn")  # a torn index is rebuilt from the bundles
    assert {e["name"] for e in hub.list_entries(filled)} == set(rows)


# ---- the Hugging Face Hub, faked -----------------------------------------------------------------

def test_push_uploads_the_bundle_and_its_file_list(filled, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(*, folder_path, repo_id, **kw):
        calls["upload"] = (repo_id, kw, {p.relative_to(folder_path).as_posix(): p.read_bytes()
                                         for p in Path(folder_path).rglob("*") if p.is_file()})

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    url = hub.push("words", filled, "me/words", token="hf_x")
    assert url == "https://huggingface.co/me/words"
    assert calls["create"] == ("me/words", {"token": "hf_x", "private": False, "repo_type": "model", "exist_ok": True})
    repo_id, kw, uploaded = calls["upload"]
    assert repo_id == "me/words" and kw["token"] == "hf_x" and kw["repo_type"] == "model"
    listing = json.loads(uploaded.pop("headstart-files.json"))
    assert set(uploaded) == set(listing["files"]) == set(hub.show("words", filled)["files"])
    assert uploaded["README.md"] == (filled / "words" / "README.md").read_bytes()


def test_pull_from_hf_verifies_the_file_list(filled, monkeypatch, tmp_path):
    import huggingface_hub

    listing = {"format": "headstart-hub-files", "format_version": 1, "name": "words",
               "files": hub.show("words", filled)["files"]}

    def snapshot_download(*, repo_id, local_dir, **kw):
        assert repo_id == "me/words" and kw["repo_type"] == "model"
        shutil.copytree(filled / "words", local_dir, dirs_exist_ok=True)
        Path(local_dir, ".gitattributes").write_text("*.safetensors filter=lfs\n")  # what HF adds
        Path(local_dir, "headstart-files.json").write_text(json.dumps(listing))
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = hub.pull("hf:me/words", None, tmp_path / "from-hf")
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == set(listing["files"])
    listing["files"]["manifest.json"] = {"sha256": "0" * 64, "size": 1}
    with pytest.raises(HubError, match="altered; pull refused"):
        hub.pull("hf:me/words", None, tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()


def test_offline_push_and_pull_fail_in_one_line(filled, monkeypatch, tmp_path):
    import httpx
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    for fn in ("create_repo", "upload_folder", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, fn, unreachable)
    with pytest.raises(HubError) as push_error:
        hub.push("words", filled, "me/words")
    with pytest.raises(HubError) as pull_error:
        hub.pull("hf:me/words", None, tmp_path / "out")
    for e, verb in ((push_error, "push to"), (pull_error, "pull from")):
        message = str(e.value)
        assert "\n" not in message and f"could not {verb} hf:me/words: ConnectError" in message
        assert "network" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(HubError, match="not a Hugging Face repository id"):
        hub.push("words", filled, "../evil")


# ---- the CLI, as a user runs it --------------------------------------------------------------------

def test_cli_round_trip(bundles, tmp_path):
    folder, out = tmp_path / "hub", tmp_path / "pulled"
    added = headstart_cmd("hub", "add", bundles["image"], "--hub", folder, "--name", "ants", "--json")
    assert added.returncode == 0, added.stderr[-2000:]
    assert json.loads(added.stdout.strip().splitlines()[-1])["task"] == "image-classification"
    listed = headstart_cmd("hub", "list", "--hub", folder)
    assert listed.returncode == 0 and "ants" in listed.stdout and "image-classification" in listed.stdout
    found = headstart_cmd("hub", "search", "--hub", folder, "--task", "image-classification", "--metric", "accuracy",
                          "--min-value", "0", "--json")
    assert [e["name"] for e in json.loads(found.stdout.strip().splitlines()[-1])] == ["ants"]
    shown = headstart_cmd("hub", "show", "ants", "--hub", folder)
    assert shown.returncode == 0 and "manifest.json" in shown.stdout and "pipeline_tag" in shown.stdout
    pulled = headstart_cmd("hub", "pull", "ants", "--hub", folder, "--out", out)
    assert pulled.returncode == 0 and (out / "manifest.json").is_file(), pulled.stderr[-2000:]
    assert_clean_error(headstart_cmd("hub", "pull", "ants", "--hub", folder, "--out", out), "already exists")
    assert_clean_error(headstart_cmd("hub", "show", "../x", "--hub", folder), "not a valid specialist name")
    assert_clean_error(headstart_cmd("hub", "search", "--hub", folder, "--task", "nope"), "unknown task")
    removed = headstart_cmd("hub", "remove", "ants", "--hub", folder)
    assert removed.returncode == 0 and not (folder / "ants").exists()
    helped = headstart_cmd("hub", "--help")
    for sub in ("add", "list", "search", "show", "pull", "remove", "push"):
        assert f"\n    {sub} " in helped.stdout, sub


def test_cli_serve_answers_for_a_hub(filled, tmp_path):
    """`headstart serve HUB` serves every hub entry by name (loopback, a free port, stopped by the test)."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    from conftest import BIN

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = tmp_path / "token"
    proc = subprocess.Popen([str(BIN / "headstart"), "serve", str(filled), "--port", str(port), "--token-file",
                             str(token), "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 90, None
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/models",
                                                 headers={"Authorization": f"Bearer {token.read_text().strip()}"})
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except (OSError, ValueError):
                time.sleep(0.5)
        assert body is not None, proc.stderr.read()[-2000:] if proc.poll() is not None else "no answer in 90 s"
        assert oct(token.stat().st_mode & 0o777) == "0o600"
        assert {m["id"] for m in body["models"]} == {"words", "colours"}, body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_command_group_lists_its_subcommands_and_alone_prints_its_help(capsys):
    from headstart.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "hub       Share specialists through a hub folder" in capsys.readouterr().out
    assert main(["hub"]) == 2  # a group without a subcommand: its help, and a usage error's status
    out = capsys.readouterr().out
    assert "headstart hub [-h] COMMAND" in out and "search    Find the hub's specialists" in out
    with pytest.raises(SystemExit) as e:
        main(["hub", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
