"""bases.gguf_cache: the dequantised copy appears atomically, is reused, and a failed run leaves nothing."""
from __future__ import annotations

import json

import pytest

from headstart.bases import gguf_cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    calls = []

    def dequantise(gguf, out):  # stands in for the slow transformers round trip
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf_cache, "_dequantise", dequantise)
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF fake")
    return gguf, calls


def test_dequantised_dir_is_written_once_then_reused(fake_gguf):
    gguf, calls = fake_gguf
    folder, sha = gguf_cache.dequantised_dir(gguf, "tiny")
    assert folder.name == f"tiny-{sha[:16]}" and (folder / "config.json").is_file()
    again, _ = gguf_cache.dequantised_dir(gguf, "tiny")
    other_name, _ = gguf_cache.dequantised_dir(gguf, "tiny-alias")  # same GGUF under another name
    assert again == folder == other_name and len(calls) == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left


def test_failed_dequantisation_leaves_no_folder(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf

    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gguf_cache, "_dequantise", broken)
    with pytest.raises(RuntimeError):
        gguf_cache.dequantised_dir(gguf, "tiny")
    root = gguf.parent / "cache" / "bases"
    assert list(root.iterdir()) == []
