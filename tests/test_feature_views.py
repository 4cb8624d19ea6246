"""Image feature views (bases/image.py FEATURE_VIEWS): what they compute, and that a probe trained on one
is saved, reloaded, shared, served and exported with the same view."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headstart
from headstart.bases import load_base
from headstart.bundle import commands
from headstart.core.errors import BundleError, ConfigError
from headstart.engine.features import base_key
from headstart.methods.probe.config import ProbeConfig

QUIET = dict(progress=False, log=lambda _: None)


def _pixels(seed: int = 0, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_views_compute_what_they_say():
    base = load_base("tiny-image").eval()
    px = _pixels()
    pooled = base(px)
    stage = f"blocks.{len(base.model.blocks) - 1}"
    layers, mirrored = base.layer_features(px), base.layer_features(px.flip(-1))

    base.set_feature_view("flip")
    assert base.feature_dim == pooled.shape[1]
    torch.testing.assert_close(base(px), (layers["final"] + mirrored["final"]) / 2)
    torch.testing.assert_close(base(px), base(px.flip(-1)))  # a mirrored photo gives the same features

    base.set_feature_view("stages")
    want = torch.cat([torch.nn.functional.normalize((layers[k] + mirrored[k]) / 2, dim=-1) for k in ("final", stage)], 1)
    assert base.feature_dim == pooled.shape[1] + layers[stage].shape[1] == want.shape[1]
    torch.testing.assert_close(base(px), want)

    base.set_feature_view("pooled")
    torch.testing.assert_close(base(px), pooled)
    assert base.feature_dim == pooled.shape[1] and "features" not in base.info.preprocessing


def test_a_view_is_preprocessing_the_cache_and_the_manifest_see():
    base = load_base("tiny-image")
    plain = base_key(base)
    base.set_feature_view("stages")
    assert base.info.preprocessing["features"] == "stages" and base_key(base) != plain
    base.set_input_size(80)  # a later resize keeps the view
    assert base.info.preprocessing["features"] == "stages" and base.info.preprocessing["input_size"] == [3, 80, 80]
    with pytest.raises(ValueError, match="unknown feature view 'mean'; choose one of: pooled, flip, stages"):
        base.set_feature_view("mean")
    with pytest.raises(ValueError, match=r"tiny-text \(text base\) offers only the 'pooled' feature view"):
        load_base("tiny-text").set_feature_view("flip")


def test_probe_config_names_the_views():
    with pytest.raises(ValueError, match="image_features must be one of pooled, flip, stages"):
        ProbeConfig(image_features="layers")


def test_bases_without_the_view_refuse_it_clearly(tiny_text_csv, tiny_image_folder):
    with pytest.raises(ConfigError, match="image_features='flip' applies to image bases; tiny-text is a text base"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="probe", image_features="flip", **QUIET)
    with pytest.raises(ConfigError, match=r"tiny-clip \(image base\) offers only the 'pooled' feature view"):
        headstart.fit(tiny_image_folder, base="tiny-clip", method="probe", image_features="stages", **QUIET)


def test_a_probe_resets_a_handed_in_base_to_its_own_view(tiny_image_folder):
    base = load_base("tiny-image")
    base.set_feature_view("stages")
    spec = headstart.fit(tiny_image_folder, base=base, method="probe", **QUIET)
    assert "features" not in spec.manifest["preprocessing"] and base.feature_view == "pooled"


@pytest.fixture(scope="module")
def stages_bundle(tiny_image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("views") / "stages"
    headstart.fit(tiny_image_folder, base="tiny-image", method="probe", image_features="stages", out=out, **QUIET)
    return out


def _items(folder: Path) -> list[str]:
    return sorted(str(p) for p in (folder / "val").rglob("*.png"))


def test_a_stages_probe_reloads_with_its_view(stages_bundle, tiny_image_folder):
    manifest = json.loads((stages_bundle / "manifest.json").read_text())
    assert manifest["preprocessing"]["features"] == "stages"
    assert manifest["method"]["config"]["image_features"] == "stages"
    spec = commands.load(stages_bundle)
    assert spec.model.base.info.preprocessing["features"] == "stages"
    items = _items(tiny_image_folder)
    again = commands.evaluate(stages_bundle, tiny_image_folder)
    assert again["accuracy"] == manifest["metrics"]["accuracy"]
    # its logits are its head on the stages features of a separately built base
    other = load_base("tiny-image").eval()
    other.set_feature_view("stages")
    with torch.no_grad():
        px = other.collate([Image.open(x) for x in items])["pixel_values"]
        torch.testing.assert_close(spec.model(pixel_values=px), spec.model.head(other(px)))


def test_a_shared_pooled_base_refuses_a_stages_bundle(stages_bundle):
    with pytest.raises(BundleError, match="trained on the 'stages' feature view, the shared base gives 'pooled'"):
        headstart.load(stages_bundle, base=load_base("tiny-image"))
    shared = load_base("tiny-image")
    shared.set_feature_view("stages")
    assert headstart.load(stages_bundle, base=shared).classes  # the same view: shared


def test_onnx_export_carries_the_view(stages_bundle, tiny_image_folder, tmp_path):
    out = commands.export(stages_bundle, tmp_path / "x.onnx", onnx=True)
    spec, onnx_spec = commands.load(stages_bundle), commands.load(out)
    items = _items(tiny_image_folder)
    with torch.no_grad():
        expected = spec.model(**spec.model.collate([Image.open(x).convert("RGB") for x in items], False)).numpy()
    got = onnx_spec.outputs(items, batch_size=5)
    assert np.abs(got - expected).max() <= 1e-4


def test_merges_refuse_specialists_of_different_views(stages_bundle, tiny_image_folder, tmp_path):
    pooled = tmp_path / "pooled"
    headstart.fit(tiny_image_folder, base="tiny-image", method="probe", out=pooled, **QUIET)
    with pytest.raises(BundleError, match="trained on the 'stages' feature view, .* on 'pooled'"):
        headstart.merge([pooled, stages_bundle], method="soup", log=lambda _: None)
