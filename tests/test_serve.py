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
import time
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


# ---- one base, many specialists ------------------------------------------------------------
def test_one_base_is_loaded_once_and_shared(client):
    registry = client.app.state.registry
    names = sorted(key[0] for key in registry.pool.bases)
    assert names == ["tiny-image", "tiny-text"]  # three text specialists, one text base
    text_base = next(b for k, b in registry.pool.bases.items() if k[0] == "tiny-text")
    backbones = {id(registry.get(i).runner.model.base) for i in ("topic-probe", "topic-lora-a", "topic-lora-b")}
    assert backbones == {id(text_base.backbone)}
    assert len(text_base.loaded) == 2


async def _interleaved(registry, order, rounds=6):
    calls = [registry.get(name).classify([TEXTS[(r + j) % len(TEXTS)]], top_k=3)
             for r in range(rounds) for j, name in enumerate(order)]
    return await asyncio.gather(*calls)


def test_lora_specialists_on_one_base_answer_interleaved_requests_as_each_does_alone(client, runs, monkeypatch):
    registry = client.app.state.registry
    order = ["topic-lora-a", "topic-lora-b", "topic-probe"]
    alone = {name: expected_rows(runs / name, TEXTS, top_k=3) for name in order}
    labels = {name: [row[0][0] for row in rows] for name, rows in alone.items()}
    assert labels["topic-lora-a"] != labels["topic-lora-b"]  # the adapters differ, so a mix-up would show
    peft = registry.get("topic-lora-a").runner.base.peft
    switch = peft.set_adapter

    def slow_switch(name):  # widen the window between selecting an adapter and the forward
        switch(name)
        time.sleep(0.01)

    monkeypatch.setattr(peft, "set_adapter", slow_switch)  # without the base's lock, answers get mixed up
    for _ in range(3):
        answers = asyncio.run(_interleaved(registry, order))
        for r in range(6):
            for j, name in enumerate(order):
                assert_rows_match(answers[r * len(order) + j], [alone[name][(r + j) % len(TEXTS)]])


def test_adapters_over_budget_are_evicted_and_reloaded_with_the_same_answers(runs):
    app = make_app([runs / "topic-lora-a", runs / "topic-lora-b"], token=None, max_adapters=1)
    base = next(iter(app.state.registry.pool.bases.values()))
    assert len(base.loaded) == 1 and base.loads == 2
    alone = {n: expected_rows(runs / n, TEXTS[:2], top_k=3) for n in ("topic-lora-a", "topic-lora-b")}
    with TestClient(app) as c:
        for name in ("topic-lora-a", "topic-lora-b", "topic-lora-a", "topic-lora-b"):
            r = c.post(f"/models/{name}/predict", json={"inputs": TEXTS[:2], "parameters": {"top_k": 3}})
            assert_rows_match(r.json(), alone[name])
            assert list(base.loaded) == [app.state.registry.get(name).runner.adapter]
    assert base.loads == 6  # every switch reloaded the evicted adapter
    assert c.app.state.registry.pool.stats()["bases"][0]["adapters_loaded"] == 1


def test_concurrent_requests_share_micro_batches(client, runs):
    served = client.app.state.registry.get("topic-probe")
    batcher = served._classify_batcher
    before = batcher.batches_run

    async def burst():
        return await asyncio.gather(*[served.classify([t], top_k=1) for t in TEXTS * 6])

    answers = asyncio.run(burst())
    assert batcher.batches_run - before <= 3  # 30 requests in a few batches, not 30 forward passes
    want = expected_rows(runs / "topic-probe", TEXTS * 6, top_k=1)
    assert_rows_match([a[0] for a in answers], want)


def test_micro_batcher_splits_large_requests_and_keeps_order():
    from headstart.serve.batching import MicroBatcher

    sizes = []

    def double(xs):
        sizes.append(len(xs))
        return [2 * x for x in xs]

    batcher = MicroBatcher(double, max_batch=4, max_wait_s=0.001)

    async def go():
        return await asyncio.gather(batcher.submit(list(range(10))), batcher.submit([100, 101]))

    first, second = asyncio.run(go())
    assert first == [2 * x for x in range(10)] and second == [200, 202]
    assert max(sizes) <= 4 and sum(sizes) == 12


# ---- auth ------------------------------------------------------------------------------------
def test_every_route_but_health_needs_the_token(client):
    for method, path in (("get", "/models"), ("get", "/models/topic-probe"), ("get", "/ready"),
                         ("post", "/models/topic-probe/predict"), ("get", "/nowhere")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = getattr(client, method)(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert client.get("/health").status_code == 200


def test_token_file_is_generated_private_and_reused(tmp_path):
    from headstart.serve.auth import resolve_token

    path = tmp_path / "sub" / "token"
    said = []
    token = resolve_token("127.0.0.1", path, say=said.append)
    assert len(token) >= 32 and str(path) in said[0]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert resolve_token("127.0.0.1", path) == token
    os.chmod(path, 0o644)
    with pytest.raises(ServeError, match="chmod 600"):
        resolve_token("127.0.0.1", path)


def test_no_auth_only_on_a_loopback_host(tmp_path):
    from headstart.serve.app import serve
    from headstart.serve.auth import resolve_token

    assert resolve_token("127.0.0.1", no_auth=True) is None
    assert resolve_token("::1", no_auth=True) is None
    with pytest.raises(ServeError, match="loopback"):
        resolve_token("0.0.0.0", no_auth=True)
    with pytest.raises(ServeError, match="allow_remote"):
        serve([str(tmp_path)], host="0.0.0.0", token_file=str(tmp_path / "t"))
    with pytest.raises(ServeError, match="needs auth"):
        serve([str(tmp_path)], host="0.0.0.0", allow_remote=True, no_auth=True)


# ---- start-up errors ---------------------------------------------------------------------------
def test_duplicate_ids_and_broken_bundles_stop_the_start_in_one_line(runs, tmp_path):
    other = tmp_path / "elsewhere" / "topic-probe"
    shutil.copytree(runs / "topic-probe", other)
    with pytest.raises(ServeError) as e:
        make_app([runs / "topic-probe", other], token=None)
    assert "two sources give the id 'topic-probe'" in one_line(e)
    broken = tmp_path / "broken"
    shutil.copytree(runs / "topic-probe", broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ServeError) as e:
        make_app([broken], token=None)
    assert "broken" in one_line(e)
    with pytest.raises(ServeError, match="not a bundle"):
        make_app([tmp_path / "elsewhere"], token=None)
    with pytest.raises(ServeError, match="no such folder"):
        make_app([tmp_path / "missing"], token=None)
    bad_name = tmp_path / "has space"
    shutil.copytree(runs / "topic-probe", bad_name)
    with pytest.raises(ServeError, match="cannot be an id"):
        make_app([bad_name], token=None)


def test_lineage_and_hub_folders_are_sources(runs, tmp_path, monkeypatch):
    from headstart.bundle.lineage import Lineage
    from headstart.hub import add

    hub = tmp_path / "hub"
    add(runs / "colours", hub, name="hub-colours")
    lineage = tmp_path / "topic"
    shutil.copytree(runs / "topic-probe", lineage)
    versions = Lineage.open(lineage)
    staged = versions.stage()
    headstart.load(lineage).save(staged)
    assert versions.commit(staged, {"strategy": "naive"}) == 2  # now a lineage folder serving v2
    app = make_app([hub, lineage], token=None)
    assert app.state.registry.ids() == ["hub-colours", "topic"]
    from headstart.serve import registry

    monkeypatch.setattr(registry, "hub_entries", lambda _: [{"name": "evil", "path": hub / ".." / ".." / "etc"}])
    with pytest.raises(ServeError, match="outside the hub"):
        make_app([hub], token=None)


# ---- bad input: a 4xx naming the problem, never a 500 -------------------------------------------
BAD_REQUESTS = [  # (path, request kwargs, status, code)
    ("/models/nobody/predict", {"json": {"inputs": "x"}}, 404, "unknown_model"),
    ("/models/topic-probe/predict", {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
     400, "invalid_json"),
    ("/models/topic-probe/predict", {"json": {"inputs": ""}}, 422, "empty_input"),
    ("/models/topic-probe/predict", {"json": {"inputs": []}}, 422, "empty_input"),
    ("/models/topic-probe/predict", {"json": {"inputs": "x" * 20_001}}, 413, "text_too_long"),
    ("/models/topic-probe/predict", {"json": {"inputs": ["ok"] * 65}}, 413, "batch_too_large"),
    ("/models/topic-probe/predict", {"json": {"inputs": 42}}, 422, "invalid_input"),
    ("/models/topic-probe/predict", {"json": {"inputs": ["ok", None]}}, 422, "invalid_input"),
    ("/models/topic-probe/predict", {"json": {"text": "no inputs"}}, 422, "invalid_request"),
    ("/models/topic-probe/predict", {"json": ["a list"]}, 422, "invalid_request"),
    ("/models/topic-probe/predict", {"json": {"inputs": "x", "parameters": {"top_k": 0}}}, 422, "invalid_parameter"),
    ("/models/topic-probe/predict", {"json": {"inputs": "x", "parameters": {"top_k": "3"}}}, 422, "invalid_parameter"),
    ("/models/topic-probe/predict", {"json": {"inputs": "x", "parameters": [1]}}, 422, "invalid_parameter"),
    ("/models/topic-probe/predict", {"content": png_bytes(), "headers": {"Content-Type": "image/png"}},
     415, "unsupported_media_type"),
    ("/models/topic-probe/predict", {"content": b"x", "headers": {"Content-Type": "application/xml"}},
     415, "unsupported_media_type"),
    ("/models/colours/predict", {"content": b"\\x89PNG not really", "headers": {"Content-Type": "image/png"}},
     422, "invalid_image"),
    ("/models/colours/predict", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 422, "empty_input"),
    ("/models/colours/predict", {"json": {"inputs": "%%% not base64"}}, 422, "invalid_image"),
    ("/models/colours/predict", {"json": {"inputs": base64.b64encode(b"hello").decode()}}, 422, "invalid_image"),
    ("/models/colours/predict", {"json": {"inputs": 3.5}}, 422, "invalid_input"),
    ("/models/colours/predict?top_k=many", {"content": png_bytes(), "headers": {"Content-Type": "image/png"}},
     422, "invalid_parameter"),
    ("/models/colours/predict", {"content": b"--x\\r\\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
     400, "invalid_multipart"),
    ("/models/..%2F..%2Fetc%2Fpasswd/predict", {"json": {"inputs": "x"}}, 404, None),
    ("/models/../../etc/passwd", {"json": {"inputs": "x"}}, 404, None),
]


@pytest.mark.parametrize("path,kwargs,status,code", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_problem(client, path, kwargs, status, code):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = client.post(path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert code is None or error["code"] == code
    assert error["message"] and "Traceback" not in error["message"] and "\\n" not in error["message"]


def test_wrong_method_and_unknown_route_are_json_4xx(client):
    r = client.get("/models/topic-probe/predict", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.get("/no/such/route", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/models/nobody", headers=AUTH)
    assert r.status_code == 404 and "topic-probe" in r.json()["error"]["message"]


def test_limits_on_body_pixels_and_time(runs, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after: make_app sets it
    tight = Limits(max_body_bytes=2000, max_image_pixels=1000, timeout_s=0.001)
    with TestClient(make_app([runs / "colours"], token=None, limits=tight)) as c:
        r = c.post("/models/colours/predict", headers={"Content-Type": "image/png"}, content=b"\\0" * 5000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        for size in ((40, 40), (100, 100)):  # over the limit; over twice the limit (PIL's bomb check)
            r = c.post("/models/colours/predict", headers={"Content-Type": "image/png"}, content=png_bytes(size=size))
            assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
        r = c.post("/models/colours/predict", headers={"Content-Type": "image/png"}, content=png_bytes(size=(20, 20)))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_unexpected_errors_are_a_500_without_detail(client, monkeypatch, caplog):
    served = client.app.state.registry.get("topic-probe")
    client = TestClient(client.app, raise_server_exceptions=False)  # answer as a real server does

    def broken(items):
        raise RuntimeError("secret internal detail /etc/shadow")

    monkeypatch.setattr(served._classify_batcher, "run_batch", broken)
    r = client.post("/models/topic-probe/predict", headers=AUTH, json={"inputs": "goal"})
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal", "message": r.json()["error"]["message"]}}
    assert "secret" not in r.text and "secret internal detail" in caplog.text


def test_fuzzed_requests_never_get_a_5xx(client):
    import random

    rng = random.Random(15)
    paths = ["/models/topic-probe/predict", "/models/colours/predict", "/models/topic-lora-a/predict",
             "/models/%2e%2e%2f%2e%2e/predict", "/models/..%2F..%2Fetc/predict", "/models/%00/predict",
             "/models/" + "a" * 300 + "/predict", "/models/topic-probe", "/models", "/ready"]
    types = ["application/json", "image/png", "image/jpeg", "multipart/form-data; boundary=xx", "text/plain",
             "application/octet-stream", "", "application/x-www-form-urlencoded", "video/mp4"]
    payloads = [lambda: rng.randbytes(rng.randrange(0, 3000)),
                lambda: json.dumps({"inputs": rng.choice([None, 1, [], {}, [[1]], "x" * 30_000, [""], True])}).encode(),
                lambda: json.dumps({"inputs": "ok", "parameters": {"top_k": rng.choice([-1, 0, 1e9, None, "x", [2]])}}).encode(),
                lambda: b'{"inputs": "' + bytes(rng.randrange(256) for _ in range(50)) + b'"}',
                lambda: b"[" * 5000 + b"]" * 5000,
                lambda: json.dumps({"inputs": base64.b64encode(rng.randbytes(200)).decode()}).encode()]
    statuses = []
    for _ in range(300):
        method = rng.choice(["post", "post", "post", "get", "put", "delete"])
        kwargs = {"headers": {**AUTH, "Content-Type": rng.choice(types)}}
        if method in ("post", "put"):
            kwargs["content"] = rng.choice(payloads)()
        r = client.request(method.upper(), rng.choice(paths), **kwargs)
        statuses.append(r.status_code)
        assert r.status_code < 500 or r.status_code == 504, (r.status_code, r.text)
        if r.status_code >= 400:
            assert set(r.json()) == {"error"}
    assert sum(400 <= s < 500 for s in statuses) > 200


# ---- generators and embeddings (the interface the OpenAI and v2 routers use) ----------------------
@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """Two ids over one tiny-llm sft bundle (copied): two adapters in one shared causal LM."""
    from bundle_fixtures import LLM_FAST

    root = tmp_path_factory.mktemp("gen")
    rows = [{"instruction": f"What is the colour of {x}?", "output": c}
            for x, c in [("snow", "white"), ("grass", "green"), ("coal", "black")] * 3]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    headstart.fit(root / "train.jsonl", base="tiny-llm", method="lora", task="sft", eval=root / "train.jsonl",
                  out=root / "colour-chat", **QUIET, **LLM_FAST)
    shutil.copytree(root / "colour-chat", root / "colour-chat-2")
    return root


def test_generators_share_their_base_and_stream_what_they_complete(generators, runs):
    app = make_app([generators / "colour-chat", generators / "colour-chat-2", runs / "topic-probe"], token=None)
    registry = app.state.registry
    chat, chat2 = registry.get("colour-chat"), registry.get("colour-chat-2")
    assert (chat.task, chat.kind) == ("text-generation", "generator")
    assert [k[0] for k in registry.pool.bases] == ["tiny-llm", "tiny-text"]
    alone = headstart.load(generators / "colour-chat").generate("What is the colour of snow?", temperature=0.0,
                                                                 max_new_tokens=6)

    async def both():
        pieces = [p async for p in chat.stream("What is the colour of snow?", temperature=0.0, max_new_tokens=6)]
        whole = await chat2.complete([{"role": "user", "content": "What is the colour of snow?"}],
                                     temperature=0.0, max_new_tokens=6)
        return pieces, whole

    pieces, whole = asyncio.run(both())
    assert "".join(pieces) == alone == whole
    with TestClient(app) as c:
        r = c.post("/models/colour-chat/predict", json={"inputs": "hi"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"
        assert c.get("/models/colour-chat").json()["task"] == "text-generation"


def test_wrong_calls_on_the_served_interface_are_api_errors(generators, runs):
    from headstart.serve.errors import ApiError

    app = make_app([generators / "colour-chat", runs / "topic-probe"], token=None)
    chat, probe = (app.state.registry.get(i) for i in ("colour-chat", "topic-probe"))
    for call in (lambda: asyncio.run(chat.classify(["x"], 1)), lambda: asyncio.run(chat.embed(["x"])),
                 lambda: probe.stream("x"), lambda: chat.stream(""), lambda: chat.stream([{"role": "x"}]),
                 lambda: chat.stream("x", max_new_tokens=0), lambda: chat.stream("x", beams=3),
                 lambda: asyncio.run(probe.classify([png_bytes()], 1))):
        with pytest.raises(ApiError) as e:
            call()
        assert 400 <= e.value.status < 500 and e.value.message


def test_embeddings_are_the_features_the_head_reads(client, runs):
    served = client.app.state.registry.get("topic-probe")
    vectors = asyncio.run(served.embed(TEXTS[:2]))
    spec = headstart.load(runs / "topic-probe")
    import torch

    with torch.no_grad():
        want = spec.model.backbone(**spec.model.collate(TEXTS[:2], False))
    assert len(vectors) == 2 and len(vectors[0]) == want.shape[1]
    assert torch.allclose(torch.tensor(vectors), want, atol=1e-5)


# ---- a real server -------------------------------------------------------------------------------
def test_real_uvicorn_on_loopback_serves_with_a_generated_token(runs, tmp_path):
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "token"
    code = (f"from headstart.serve import serve; serve([{str(runs / 'topic-probe')!r}], port={port}, "
            f"token_file={str(token_file)!r}, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):  # up to 60 s to start
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.25)
        token = token_file.read_text().strip()
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
        r = httpx.post(f"{url}/models/topic-probe/predict", headers={"Authorization": f"Bearer {token}"},
                       content=json.dumps({"inputs": TEXTS[0]}), timeout=30)  # curl -d: form-urlencoded
        assert r.status_code == 200 and r.json()[0]["label"] == headstart.load(runs / "topic-probe").predict(TEXTS[:1])[0]
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"auth token written to {token_file}" in out


# ---- real bases, real data ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(data_root, tmp_path_factory) -> Path:
    """A minilm-l6 trec probe and an efficientnet-lite0 hymenoptera probe, fit on small slices."""
    import csv

    root = tmp_path_factory.mktemp("real")
    (root / "trec").mkdir()
    for split, n in (("train", 240), ("test", 40)):
        with open(data_root / "trec" / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))[:n]
        with open(root / "trec" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    for split, n in (("train", 12), ("val", 4)):
        for cls in ("ants", "bees"):
            target = root / "hymenoptera" / split / cls
            target.mkdir(parents=True)
            for photo in sorted((data_root / "hymenoptera" / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(photo, target / photo.name)
    headstart.fit(root / "trec", base="minilm-l6", method="probe", out=root / "trec-probe", **QUIET)
    headstart.fit(root / "hymenoptera", base="efficientnet-lite0", method="probe", out=root / "ants", **QUIET)
    return root


@pytest.mark.real
def test_real_text_and_photo_get_the_bundles_own_labels(real_runs, data_root):
    questions = ["Who wrote Hamlet ?", "How far is the Moon from the Earth ?", "What is the capital of Peru ?",
                 "Why is the sky blue ?"]
    photos = sorted((data_root / "hymenoptera" / "val" / "bees").glob("*.jpg"))[-2:] + \
        sorted((data_root / "hymenoptera" / "val" / "ants").glob("*.jpg"))[-2:]
    trec, ants = headstart.load(real_runs / "trec-probe"), headstart.load(real_runs / "ants")
    with TestClient(make_app([real_runs / "trec-probe", real_runs / "ants"], token=TOKEN)) as c:
        r = c.post("/models/trec-probe/predict", headers=AUTH, json={"inputs": questions, "parameters": {"top_k": 3}})
        assert r.status_code == 200, r.text
        assert [row[0]["label"] for row in r.json()] == trec.predict(questions)
        for photo, want in zip(photos, ants.predict([str(p) for p in photos])):
            r = c.post("/models/ants/predict", headers={**AUTH, "Content-Type": "image/jpeg"},
                       content=photo.read_bytes())
            assert r.status_code == 200 and r.json()[0]["label"] == want, r.text
        facts = {m["id"]: m for m in c.get("/models", headers=AUTH).json()["models"]}
        assert facts["ants"]["task"] == "image-classification" and facts["trec-probe"]["base"]["name"] == "minilm-l6"
