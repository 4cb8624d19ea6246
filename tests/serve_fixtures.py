"""What the server tests share: tiny bundles over shared bases, a client, and how to compare answers."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import headstart
from bundle_fixtures import QUIET
from headstart.serve.app import make_app

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["goal team match", "pizza soup bread", "laptop code chip", "my very apple today", "goal pizza chip"]


@pytest.fixture(scope="module")
def runs(tiny_text_csv, tiny_image_folder, tmp_path_factory) -> Path:
    """runs/: a text probe, two text LoRA specialists (different seeds), an image probe."""
    root = tmp_path_factory.mktemp("runs")
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", out=root / "topic-probe", **QUIET)
    for seed, name in ((0, "topic-lora-a"), (1, "topic-lora-b")):
        # A short fit from a random head: probabilities far from 0 and 1, so a wrong adapter shows.
        headstart.fit(tiny_text_csv, base="tiny-text", method="lora", epochs=1, lr=0.01, head_init="random",
                      seed=seed, out=root / name, **QUIET)
    headstart.fit(tiny_image_folder, base="tiny-image", method="probe", out=root / "colours", **QUIET)
    return root


@pytest.fixture(scope="module")
def client(runs) -> TestClient:
    app = make_app([runs / n for n in ("topic-probe", "topic-lora-a", "topic-lora-b", "colours")], token=TOKEN)
    with TestClient(app) as c:
        yield c


def png_bytes(colour=(200, 30, 30), size=(48, 48), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def expected_rows(folder: Path, inputs, top_k: int = 2):
    """What the bundle answers alone, loaded the ordinary way (its own base)."""
    spec = headstart.load(folder)
    probs = spec.predict_proba(inputs)
    k = min(top_k, len(spec.classes))
    return [[(spec.classes[i], float(s)) for s, i in zip(*[t.tolist() for t in p.topk(k)])] for p in probs]


def assert_rows_match(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g_row, w_row in zip(got, want):
        assert [g["label"] for g in g_row] == [w[0] for w in w_row]
        for g, w in zip(g_row, w_row):
            assert abs(g["score"] - w[1]) < tol
