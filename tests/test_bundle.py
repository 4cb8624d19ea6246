"""The bundle: written atomically, base hash checked on load, JSON + safetensors only (no pickle)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import headstart
import headstart.bundle.plots
import headstart.bundle.classifier
from headstart.core.errors import BundleError

ALLOWED_SUFFIXES = {".json", ".safetensors", ".png", ".md"}
"""Everything a bundle may hold (PEFT's adapter folder is adapter_config.json,
adapter_model.safetensors and its own README.md)."""
PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2 starts with PROTO (0x80)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container (a pickle inside)


@pytest.fixture(scope="module")
def bundle(tiny_text_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "spec"
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", progress=False, out=out)
    return out


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "copy" / "spec"
    shutil.copytree(bundle, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


# ---- atomic write ---------------------------------------------------------------------------

class DiskFull(RuntimeError):
    pass


@pytest.mark.parametrize("where,exc", [("plot", DiskFull), ("artifacts", DiskFull), ("artifacts", KeyboardInterrupt)])
def test_failed_save_leaves_old_bundle_intact(bundle_copy, monkeypatch, where, exc):
    spec = headstart.load(bundle_copy)
    before = snapshot(bundle_copy)

    def boom(*args, **kwargs):
        raise exc("mid-way through writing the bundle")

    if where == "plot":  # wherever the plot function is looked up from
        monkeypatch.setattr(headstart.bundle.plots, "plot_confusion", boom)
        if hasattr(headstart.bundle.classifier, "plot_confusion"):
            monkeypatch.setattr(headstart.bundle.classifier, "plot_confusion", boom)
    else:
        monkeypatch.setattr(type(spec.method), "save_artifacts", boom)
    with pytest.raises(exc):
        spec.save(bundle_copy)

    assert snapshot(bundle_copy) == before, "the old bundle changed"
    assert [p.name for p in bundle_copy.parent.iterdir()] == [bundle_copy.name], "a temporary folder was left"
    monkeypatch.undo()
    assert headstart.load(bundle_copy).predict(["goal"]) == spec.predict(["goal"])


def test_successful_resave_replaces_and_cleans_up(bundle_copy):
    spec = headstart.load(bundle_copy)
    (bundle_copy / "stale.json").write_text("{}")  # from an older bundle: must not survive the swap
    spec.save(bundle_copy)
    assert not (bundle_copy / "stale.json").exists()
    assert [p.name for p in bundle_copy.parent.iterdir()] == [bundle_copy.name]
    assert headstart.load(bundle_copy).classes == spec.classes


# ---- loading checks -------------------------------------------------------------------------

def test_load_refuses_base_hash_mismatch(bundle_copy):
    path = bundle_copy / "manifest.json"
    m = json.loads(path.read_text())
    real = m["base"]["sha256"]
    m["base"]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        headstart.load(bundle_copy)
    msg = one_line(e)
    assert "base mismatch" in msg and "tiny-text" in msg
    assert "000000000000" in msg and real[:12] in msg  # both hashes, so the user sees what differs


def test_missing_manifest_is_a_bundle_error(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError) as e:
        headstart.load(bundle_copy)
    assert "manifest.json" in one_line(e)
    with pytest.raises(BundleError):
        headstart.load(tmp_path / "no-such-bundle")


def test_missing_weights_or_bad_manifest_is_a_bundle_error(bundle_copy):
    (bundle_copy / "trained.safetensors").unlink()
    with pytest.raises(BundleError) as e:
        headstart.load(bundle_copy)
    assert "trained.safetensors" in one_line(e)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError):
        headstart.load(bundle_copy)


# ---- no pickle anywhere ---------------------------------------------------------------------

def assert_no_pickle(folder: Path) -> int:
    from safetensors import safe_open

    files = [p for p in folder.rglob("*") if p.is_file()]
    for p in files:
        head = p.read_bytes()[:4]
        if p.suffix == ".safetensors":
            # A safetensors file starts with its header length, whose low byte may well be 0x80: it must
            # parse as safetensors (which no pickle or torch.save zip does) rather than lack the magic.
            with safe_open(str(p), "pt") as f:
                list(f.keys())
        else:
            assert not head.startswith(PICKLE_MAGIC), f"{p} starts with pickle magic"
        assert head != ZIP_MAGIC, f"{p} looks like a torch.save zip (pickle inside)"
    return len(files)


def test_no_pickle_in_bundles_feature_cache_or_checkpoints(tiny_text_csv, tiny_image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))  # only what this test writes
    bundles = {
        "lora": headstart.fit(tiny_text_csv, base="tiny-text", method="lora", epochs=1, progress=False,
                              out=tmp_path / "lora"),
        "probe": headstart.fit(tiny_image_folder, base="tiny-image", method="probe", progress=False,
                               out=tmp_path / "probe"),
    }
    for name in bundles:
        folder = tmp_path / name
        for p in folder.rglob("*"):
            if p.is_file():
                assert p.suffix in ALLOWED_SUFFIXES, f"unexpected file in bundle: {p.relative_to(folder)}"
        assert (folder / "adapter").is_dir() == (name == "lora")
        assert assert_no_pickle(folder) >= 4

    assert list((cache / "features").rglob("*.safetensors")), "probe wrote no feature cache"
    assert assert_no_pickle(cache) >= 1

    # A checkpoint left by an interrupted run.
    from headstart.methods.finetune import Finetune

    def interrupt(self, model, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        model.train()

    monkeypatch.setattr(Finetune, "set_mode", interrupt)
    with pytest.raises(KeyboardInterrupt):
        headstart.fit(tiny_text_csv, base="tiny-text", method="finetune", epochs=3, progress=False,
                      out=tmp_path / "ft")
    ckpt = tmp_path / ".ft.checkpoint"
    assert (ckpt / "state.json").is_file()
    for p in ckpt.rglob("*"):
        assert p.suffix in {".json", ".safetensors"}, p
    assert assert_no_pickle(ckpt) >= 3
