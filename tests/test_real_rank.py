"""Ranking on the real bases and real data (marker `real`; `make test` runs them)."""
from __future__ import annotations

import math

import pytest

import headstart
from headstart.transfer import rank as rank_module

pytestmark = pytest.mark.real
QUIET = {"progress": False, "log": lambda s: None}


def test_rank_hymenoptera_layers_of_real_efficientnets_then_fit_auto(data_root, monkeypatch):
    ranking = headstart.rank(data_root / "hymenoptera", bases="efficientnet-lite0,efficientnet-lite1", layers="all",
                             **QUIET)
    assert ranking.examples == 244  # the training split (the "image not found" GIF sits in val)
    assert len(ranking.candidates) == 2 * len(headstart.load_base("efficientnet-lite0").feature_layers())
    for c in ranking.candidates:
        assert all(math.isfinite(v) for v in (c.logme, c.hscore, c.knn))
        assert (c.leep is not None) == (c.layer == "final")  # the ImageNet head reads the final features
    # ImageNet features are most useful near the top: stem-side stages cannot tell ants from bees
    assert ranking.best().layer in ("final", "blocks.6", "blocks.5")
    lite0 = {c.layer: c for c in ranking.candidates if c.base == "efficientnet-lite0"}
    assert lite0["final"].logme > lite0["blocks.1"].logme and lite0["final"].knn > lite0["blocks.1"].knn

    monkeypatch.setitem(rank_module.DEFAULT_CANDIDATES, "image", ["efficientnet-lite0", "efficientnet-lite1"])
    spec = headstart.fit(data_root / "hymenoptera", base="auto", method="probe", **QUIET)
    finals = [c for c in ranking.candidates if c.layer == "final"]
    assert spec.manifest["base"]["name"] == max(finals, key=lambda c: c.logme).base
    assert spec.manifest["details"]["features_extracted"] == 0  # ranking already cached the training features
    assert spec.manifest["metrics"]["accuracy"] > 0.9


def test_rank_trec_on_every_minilm_layer(data_root):
    ranking = headstart.rank(data_root / "trec", bases="minilm-l6", layers="all", max_examples=1000, **QUIET)
    assert ranking.examples == 1000 and ranking.classes == 6
    assert len(ranking.candidates) == 6  # layer.0 .. layer.4 and final
    assert all(c.leep is None and c.nce is None for c in ranking.candidates)
    assert ranking.to_json()["candidates"][0]["logme"] == ranking.best().logme
