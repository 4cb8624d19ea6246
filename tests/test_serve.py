"""The server core: registry, shared bases, LoRA adapter selection, micro-batching, auth, limits, errors.

Most tests drive the app in process with FastAPI's TestClient over tiny random bases; one starts real
uvicorn on 127.0.0.1; the `real` ones classify real text and a real photo with real bases.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import headstart
from bundle_fixtures import QUIET, one_line  # noqa: F401
from headstart.serve.app import make_app
from headstart.serve.errors import ServeError
from headstart.serve.limits import Limits

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["goal team match", "pizza soup bread", "laptop code chip", "my very apple today", "goal pizza chip"]


@pytest.fixture(scope="module")
def runs(tiny_text_csv, tiny_image_folder, tmp_path_factory) -> Path:
    """runs/: a text probe, two text LoRA specialists (different seeds), an image probe."""
    root = tmp_path_factory.mktemp("runs")
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", out=root / "topic-probe", **QUIET)
    for seed, name in ((0, "topic-lora-a"), (1, "topic-lora-b")):
        headstart.fit(tiny_text_csv, base="tiny-text", method="lora", epochs=2, lr=0.05, seed=seed,
                      out=root / name, **QUIET)
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


# ---- the documented routes -----------------------------------------------------------------
def test_models_lists_every_specialist_with_its_facts(client):
    r = client.get("/models", headers=AUTH)
    assert r.status_code == 200
    models = {m["id"]: m for m in r.json()["models"]}
    assert set(models) == {"topic-probe", "topic-lora-a", "topic-lora-b", "colours"}
    assert models["topic-probe"]["task"] == "text-classification"
    assert models["colours"]["task"] == "image-classification"
    assert models["topic-lora-a"]["method"] == "lora" and models["topic-lora-a"]["shares_base"] == "lora"
    assert models["topic-probe"]["shares_base"] == "head"
    assert sorted(models["topic-probe"]["labels"]) == ["food", "sport", "tech"]


def test_model_details_hold_metrics_and_card(client):
    r = client.get("/models/topic-probe", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert "accuracy" in body["metrics"] and body["card"].startswith("---")
    assert "confusion" not in body["metrics"]


def test_predict_text_in_hf_shapes_matches_the_bundle_alone(client, runs):
    r = client.post("/models/topic-probe/predict", headers=AUTH, json={"inputs": TEXTS[0], "parameters": {"top_k": 2}})
    assert r.status_code == 200, r.text
    assert_rows_match([r.json()], expected_rows(runs / "topic-probe", TEXTS[:1]))
    r = client.post("/models/topic-probe/predict", headers=AUTH, json={"inputs": TEXTS, "parameters": {"top_k": 2}})
    assert_rows_match(r.json(), expected_rows(runs / "topic-probe", TEXTS))
    one = client.post("/models/topic-probe/predict", headers=AUTH, json={"inputs": TEXTS[1]}).json()
    assert len(one) == 1 and set(one[0]) == {"label", "score"}


def test_curl_style_form_urlencoded_json_body_is_read_as_json(client):
    r = client.post("/models/topic-probe/predict", headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                    content=json.dumps({"inputs": TEXTS[2]}))
    assert r.status_code == 200 and r.json()[0]["label"] in ("food", "sport", "tech")


def test_predict_image_raw_multipart_and_base64_agree(client, runs, tiny_image_folder):
    photo = sorted((tiny_image_folder / "val" / "red").glob("*.png"))[0]
    data = photo.read_bytes()
    want = expected_rows(runs / "colours", [str(photo)], top_k=3)
    raw = client.post("/models/colours/predict?top_k=3", headers={**AUTH, "Content-Type": "image/png"}, content=data)
    assert raw.status_code == 200, raw.text
    assert_rows_match([raw.json()], want)
    multi = client.post("/models/colours/predict?top_k=3", headers=AUTH,
                        files=[("file", ("a.png", data, "image/png")), ("file", ("b.png", data, "image/png"))])
    assert multi.status_code == 200, multi.text
    assert_rows_match(multi.json(), want * 2)
    b64 = base64.b64encode(data).decode()
    for inputs in (b64, f"data:image/png;base64,{b64}"):
        r = client.post("/models/colours/predict", headers=AUTH, json={"inputs": inputs, "parameters": {"top_k": 3}})
        assert_rows_match([r.json()], want)


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}  # no token needed
    r = client.get("/ready", headers=AUTH)
    assert r.status_code == 200 and r.json()["ready"] and r.json()["models"] == 4
