"""The server core: registry, shared bases, LoRA adapter selection, micro-batching, generators, a real uvicorn.

Most tests drive the app in process with FastAPI's TestClient over tiny random bases; one starts real
uvicorn on 127.0.0.1; the `real` one classifies real text and real photos with real bases.
(Auth, limits and bad input: tests/test_serve_safety.py.)
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import headstart
from bundle_fixtures import QUIET, one_line
from headstart.serve.app import make_app
from headstart.serve.errors import ServeError
from serve_fixtures import (  # noqa: F401  (fixtures are found by name)
    AUTH, TEXTS, TOKEN, assert_rows_match, client, expected_rows, png_bytes, runs)


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


def test_an_image_lora_and_an_image_probe_share_one_base(runs, tiny_image_folder, tmp_path):
    headstart.fit(tiny_image_folder, base="tiny-image", method="lora", epochs=1, lr=0.01, head_init="random",
                  out=tmp_path / "colours-lora", **QUIET)
    app = make_app([runs / "colours", tmp_path / "colours-lora"], token=None)
    registry = app.state.registry
    assert len(registry.pool.bases) == 1 and registry.get("colours-lora").facts()["shares_base"] == "lora"
    photos = sorted((tiny_image_folder / "val").rglob("*.png"))[::5]
    images = [Image.open(p).convert("RGB") for p in photos]
    for name, folder in (("colours-lora", tmp_path / "colours-lora"), ("colours", runs / "colours")):
        got = asyncio.run(registry.get(name).classify(images, top_k=3))
        assert_rows_match(got, expected_rows(folder, [str(p) for p in photos], top_k=3))


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


def test_a_bundle_with_a_head_per_task_serves_each_head_over_one_adapter(runs, tiny_text_csv, tmp_path):
    from conftest import text_rows, write_table
    from headstart.combine.multitask import fit_multitask

    food = tmp_path / "food"
    for split, seed in (("train", 1), ("test", 2)):
        write_table(food / f"{split}.csv", [(t, "yes" if y == "food" else "no") for t, y in text_rows(24, seed)])
    fit_multitask({"topic": tiny_text_csv, "food": food}, method="lora", base="tiny-text", r=2, batch_size=8,
                  epochs=1, seed=0, out=tmp_path / "multi", **QUIET)
    app = make_app([tmp_path / "multi"], token=None)
    registry = app.state.registry
    assert registry.ids() == ["multi.food", "multi.topic"]
    base = next(iter(registry.pool.bases.values()))
    assert len(base.known) == 1  # both heads read one injected adapter
    for head in ("food", "topic"):
        served = registry.get(f"multi.{head}")
        assert served.facts()["head"] == head
        spec = headstart.load(tmp_path / "multi", head=head)
        got = asyncio.run(served.classify(TEXTS, top_k=1))
        assert [row[0]["label"] for row in got] == spec.predict(TEXTS)


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


def test_a_probe_on_a_causal_lm_base_ignores_the_generators_adapters_there(generators, tmp_path):
    from conftest import text_rows, write_table

    data = tmp_path / "topic"
    write_table(data / "train.csv", text_rows(30, seed=0))
    write_table(data / "test.csv", text_rows(12, seed=1))
    headstart.fit(data, base="tiny-llm", method="probe", out=tmp_path / "llm-probe", **QUIET)
    app = make_app([generators / "colour-chat", tmp_path / "llm-probe"], token=None)
    registry = app.state.registry
    assert len(registry.pool.bases) == 1
    chat, probe = registry.get("colour-chat"), registry.get("llm-probe")
    chat.generator._activate()  # the generator's adapter is the active one in the shared modules
    got = asyncio.run(probe.classify(TEXTS, top_k=2))
    assert_rows_match(got, expected_rows(tmp_path / "llm-probe", TEXTS, top_k=2), tol=1e-4)


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
