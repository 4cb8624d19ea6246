"""Hardened loading: a corrupt, truncated or tampered bundle is one BundleError line naming the problem,
and nothing in it runs (pickles are refused, adapters load only from safetensors)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import headstart
from headstart.bundle import commands
from headstart.core.errors import BundleError, HeadstartError

from bundle_fixtures import (  # noqa: F401  (fixtures are found by name)
    INPUTS, copy_of, edit_manifest, lora_bundle, one_line, probe_bundle, sft_bundle, sft_files)


class Boom:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(probe_bundle, copy_of, tmp_path):
    folder = copy_of(probe_bundle)
    marker = tmp_path / "ran"
    (folder / "trained.safetensors").write_bytes(pickle.dumps(Boom(marker), protocol=4))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "trained.safetensors" in one_line(e) and "pickle" in one_line(e)
    assert not marker.exists()


def test_safetensors_starting_like_a_pickle_still_load(probe_bundle, copy_of):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 is a valid one."""
    folder = copy_of(probe_bundle)
    path = folder / "trained.safetensors"
    stored = load_file(path)
    for pad in range(700):
        save_file(stored, path, metadata={"format": "headstart-bundle", "pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":  # pickle protocol 2's opening bytes
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    expected = headstart.load(probe_bundle).predict_proba(INPUTS)
    torch.testing.assert_close(headstart.load(folder).predict_proba(INPUTS), expected)


def test_truncated_weights_name_the_file(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    data = (folder / "trained.safetensors").read_bytes()
    (folder / "trained.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "trained.safetensors" in one_line(e) and "damaged" in one_line(e)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_adapter_weights_load_only_from_safetensors(lora_bundle, copy_of, tmp_path, monkeypatch, name):
    folder = copy_of(lora_bundle)
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"
    (folder / "adapter" / name).write_bytes(pickle.dumps(Boom(marker)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert name in one_line(e) and not marker.exists()


def test_adapter_pickle_under_the_safetensors_name_is_refused(sft_bundle, copy_of, tmp_path):
    folder = copy_of(sft_bundle)
    marker = tmp_path / "ran"
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(pickle.dumps(Boom(marker)))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "pickle" in one_line(e) and not marker.exists()


@pytest.mark.parametrize("change,needle", [
    (lambda m: m.pop("base"), "`base`"),
    (lambda m: m["base"].pop("sha256"), "`base.sha256`"),
    (lambda m: m.update(method="probe"), "`method`"),
    (lambda m: m["method"].update(config=[1]), "`method.config`"),
    (lambda m: m.update(heads={"default": {"classes": "food"}}), "head 'default'"),
    (lambda m: m.update(kind="toaster"), "kind"),
    (lambda m: m.update(format_version="2"), "format_version"),
    (lambda m: m.update(format_version=99), "newer"),
    (lambda m: m.update(adapters={"default": "../../etc"}), "outside the bundle"),
    (lambda m: m["heads"]["default"].update(weights="/etc/passwd"), "outside the bundle"),
    (lambda m: m["method"].update(config={"no_such_option": 1}), "method"),
    (lambda m: m["heads"]["default"].update(classes=["a", "b"]), "do not fit"),
])
def test_bad_manifest_is_one_line_naming_the_problem(probe_bundle, copy_of, change, needle):
    folder = copy_of(probe_bundle)
    edit_manifest(folder, change)
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert needle in one_line(e)


def test_info_on_a_damaged_bundle_is_a_headstart_error(sft_bundle, copy_of):
    folder = copy_of(sft_bundle)
    edit_manifest(folder, lambda m: m.pop("adapters"))
    with pytest.raises(HeadstartError) as e:
        commands.info(folder)
    assert "adapters" in one_line(e)


def test_a_generator_shares_only_a_causal_lm_base(sft_bundle):
    with pytest.raises(BundleError) as e:
        headstart.load(sft_bundle, base=headstart.load_base("tiny-text"))
    assert "causal-LM" in one_line(e)


def test_a_classifier_adapter_folder_named_elsewhere_is_refused(lora_bundle, copy_of):
    folder = copy_of(lora_bundle)
    (folder / "adapter").rename(folder / "lora-a")
    edit_manifest(folder, lambda m: m.update(adapters={"default": "lora-a"}))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "lora-a" in one_line(e)


def test_a_generator_adapter_folder_comes_from_the_manifest(sft_bundle, copy_of):
    folder = copy_of(sft_bundle)
    (folder / "adapter").rename(folder / "terse")
    edit_manifest(folder, lambda m: m.update(adapters={"terse": "terse"}))
    spec, reference = headstart.load(folder), headstart.load(sft_bundle)
    batch = reference.tokenizer(["What is the colour of snow?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(spec.model(**batch).logits, reference.model(**batch).logits)
    assert commands.info(folder)["adapters"] == {"terse": "terse"}
