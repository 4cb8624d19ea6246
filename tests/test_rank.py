"""Transferability ranking on tiny bases: per-layer features, their cache, `rank`, `fit --base auto`, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

import headstart
from headstart.engine.features import cached_features, cached_layer_features
from headstart.core.errors import ConfigError, DataError
from headstart.methods.base import loader_for
from headstart.transfer import rank as rank_module

from conftest import assert_clean_error, headstart_cli

QUIET = {"progress": False, "log": lambda s: None}


@pytest.mark.parametrize("name, inputs", [
    ("tiny-image", None),
    ("tiny-text", ["red apple sky", "a much longer text about green grass and leaves", "blue"]),
    ("tiny-llm", ["red apple sky", "a much longer text about green grass and leaves", "blue"]),
])
def test_layer_features_cover_every_layer_and_final_is_forward(name, inputs):
    from PIL import Image

    base = headstart.load_base(name).eval()
    items = inputs or [Image.new("RGB", (50, 40), c) for c in ("red", "green", "blue")]
    batch = base.collate(items)
    layers = base.feature_layers()
    assert layers[-1] == "final" and len(layers) >= 2 and len(set(layers)) == len(layers)
    with torch.no_grad():
        feats = base.layer_features(**batch)
        plain = base(**batch)
    assert list(feats) == layers
    torch.testing.assert_close(feats["final"], plain)
    assert all(f.shape[0] == 3 and f.ndim == 2 and torch.isfinite(f).all() for f in feats.values())
    # padding must not leak into the pooled intermediate features: a text alone == the same text in a batch
    if inputs:
        with torch.no_grad():
            alone = base.layer_features(**base.collate(items[2:]))
        for layer in layers:
            torch.testing.assert_close(alone[layer][0], feats[layer][2], atol=1e-5, rtol=1e-4)


def test_layer_cache_extracts_once_and_final_is_shared_with_fit(tiny_text_csv):
    base = headstart.load_base("tiny-text")
    texts = [f"text number {i} about red apples" for i in range(10)]
    load = loader_for("text")
    first, n1 = cached_layer_features(base, texts, load, ["layer.0", "final"], progress=False)
    again, n2 = cached_layer_features(base, texts[::-1], load, ["layer.0", "final"], progress=False)
    assert (n1, n2) == (10, 0)
    torch.testing.assert_close(again["layer.0"], first["layer.0"].flip(0))
    feats, extracted = cached_features(base, texts, load, progress=False)
    assert extracted == 0
    torch.testing.assert_close(feats, first["final"])
    with pytest.raises(ValueError, match="no feature layer"):
        cached_layer_features(base, texts, load, ["layer.99"], progress=False)


def test_rank_images_every_layer(tiny_image_folder):
    ranking = headstart.rank(tiny_image_folder, bases="tiny-image", layers="all", **QUIET)
    base = headstart.load_base("tiny-image")
    assert sorted(c.layer for c in ranking.candidates) == sorted(base.feature_layers())
    logmes = [c.logme for c in ranking.candidates]
    assert logmes == sorted(logmes, reverse=True)
    for c in ranking.candidates:
        # LEEP / NCE read the source (ImageNet-style) classifier, which sits on the final features only
        assert (c.leep is not None) == (c.layer == "final") == (c.nce is not None)
        assert 0.0 <= c.knn <= 1.0 and c.seconds >= 0
    assert ranking.examples == 24  # 8 per class; the corrupt x.jpg is skipped
    out = ranking.to_json()
    assert set(out["candidates"][0]) >= {"base", "layer", "logme", "nce", "leep", "hscore", "knn", "seconds"}
    json.dumps(out)  # plain JSON
    # the features are cached now: ranking again extracts nothing
    again = headstart.rank(tiny_image_folder, bases="tiny-image", layers="all", **QUIET)
    assert again.extracted == {"tiny-image": 0}
    assert [c.logme for c in again.candidates] == pytest.approx(logmes)


def test_rank_text_bases_and_order_by_another_score(tiny_text_csv):
    ranking = headstart.rank(tiny_text_csv, bases=["tiny-text", "tiny-llm"], layers="final", by="knn", **QUIET)
    assert sorted(c.base for c in ranking.candidates) == ["tiny-llm", "tiny-text"]
    assert all(c.leep is None and c.nce is None for c in ranking.candidates)  # no source classifier
    knns = [c.knn for c in ranking.candidates]
    assert knns == sorted(knns, reverse=True)
    assert ranking.best() is ranking.candidates[0]


def test_rank_caps_examples_class_stratified(tiny_text_csv):
    ranking = headstart.rank(tiny_text_csv, bases="tiny-text", max_examples=30, **QUIET)
    assert ranking.examples == 30


def test_rank_errors(tiny_image_folder, tiny_text_csv):
    with pytest.raises(ConfigError, match="no layer"):
        headstart.rank(tiny_image_folder, bases="tiny-image", layers="blocks.99", **QUIET)
    with pytest.raises(DataError, match="text base"):
        headstart.rank(tiny_image_folder, bases="tiny-text", **QUIET)
    with pytest.raises(ConfigError, match="rank by"):
        headstart.rank(tiny_text_csv, bases="tiny-text", by="accuracy", **QUIET)
    with pytest.raises(ConfigError, match="twice"):
        headstart.rank(tiny_text_csv, bases="tiny-text,tiny-text", **QUIET)


def test_fit_base_auto_fits_the_best_ranked_base(tiny_text_csv, monkeypatch):
    monkeypatch.setitem(rank_module.DEFAULT_CANDIDATES, "text", ["tiny-text", "tiny-llm"])
    messages: list[str] = []
    spec = headstart.fit(tiny_text_csv, base="auto", method="probe", progress=False, log=messages.append)
    ranking = spec.manifest["details"]["base_ranking"]
    best = ranking["candidates"][0]["base"]
    assert spec.manifest["base"]["name"] == best
    assert sorted(c["base"] for c in ranking["candidates"]) == ["tiny-llm", "tiny-text"]
    assert any(m.startswith(f"base auto: {best} ranks first") for m in messages)


def test_default_ranking_leaves_out_a_base_not_fetched_yet(tiny_text_csv, monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path))  # mpnet-base is not in this cache
    monkeypatch.delenv("HEADSTART_MPNET_DIR", raising=False)
    monkeypatch.setitem(rank_module.DEFAULT_CANDIDATES, "text", ["tiny-text", "mpnet-base"])
    messages: list[str] = []
    ranking = headstart.rank(tiny_text_csv, progress=False, log=messages.append)
    assert [c.base for c in ranking.candidates] == ["tiny-text"]
    assert any("mpnet-base left out (not fetched yet" in m for m in messages)


def test_cli_rank_json_and_errors(tiny_image_folder):
    result = headstart_cli("rank", tiny_image_folder, "--bases", "tiny-image", "--layers", "all", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["candidates"][0]["base"] == "tiny-image" and len(out["candidates"]) >= 2
    assert "best by logme" in result.stderr
    assert_clean_error(headstart_cli("rank", tiny_image_folder, "--bases", "tiny-image", "--layers", "nope"),
                       "no layer")


def test_stratified_cap_is_exact_seeded_and_keeps_every_class():
    from headstart.data import Split
    from headstart.transfer.rank import _stratified

    split = Split(list(range(101)), [0] * 50 + [1] * 30 + [2] * 20 + [3])
    sample = _stratified(split, 40, seed=0)
    counts = [sample.labels.count(c) for c in range(4)]
    assert len(sample) == 40 and counts[3] == 1 and abs(counts[0] - 20) <= 1 and abs(counts[1] - 12) <= 1
    assert _stratified(split, 40, seed=0).items == sample.items != _stratified(split, 40, seed=1).items
    assert _stratified(split, 500, seed=0) is split
