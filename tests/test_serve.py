"""The server core: registry, shared bases, LoRA adapter selection, micro-batching, generators.

The tests drive the app in process (FastAPI's TestClient, or the `Served` interface) over tiny random bases.
(Auth, limits and bad input: tests/test_serve_safety.py; uvicorn and real bases: tests/test_serve_real.py.)
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import headstart
from bundle_fixtures import QUIET, one_line
from headstart.serve.app import make_app
from headstart.serve.errors import ServeError
from serve_fixtures import (  # noqa: F401  (fixtures are found by name)
    AUTH, TEXTS, assert_rows_match, client, expected_rows, png_bytes, runs)


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
    lora, probe = registry.get("colours-lora"), registry.get("colours")

    async def both():  # one mixed batch: the LoRA's rows through its adapter convs, the probe's through none
        return await asyncio.gather(lora.classify(images, top_k=3), probe.classify(images, top_k=3))

    got_lora, got_probe = asyncio.run(both())
    assert lora._classify_batcher.batches_run == 1
    assert_rows_match(got_lora, expected_rows(tmp_path / "colours-lora", [str(p) for p in photos], top_k=3))
    assert_rows_match(got_probe, expected_rows(runs / "colours", [str(p) for p in photos], top_k=3))


def _one_adapter_mb(runs) -> float:
    """MB of one topic-lora adapter's weights as the server holds them."""
    base = next(iter(make_app([runs / "topic-lora-a"], token=None).state.registry.pool.bases.values()))
    return sum(base.adapter_bytes.values()) / 2**20


def test_switching_adapters_sets_only_the_lora_layers_and_answers_as_each_alone(runs, monkeypatch):
    # PEFT's set_adapter walks every module: a switch between classifiers' adapters sets the LoRA layers'
    # active adapter directly; after an eviction and reload it must still select the right one.
    app = make_app([runs / "topic-lora-a", runs / "topic-lora-b"], token=None, max_adapters=1)
    base = next(iter(app.state.registry.pool.bases.values()))
    alone = {n: expected_rows(runs / n, TEXTS[:2], top_k=3) for n in ("topic-lora-a", "topic-lora-b")}
    calls = []
    monkeypatch.setattr(base.peft, "set_adapter", lambda *a, **k: calls.append(a))
    with TestClient(app) as c:
        for name in ("topic-lora-a", "topic-lora-b", "topic-lora-b", "topic-lora-a"):
            r = c.post(f"/models/{name}/predict", json={"inputs": TEXTS[:2], "parameters": {"top_k": 3}})
            assert_rows_match(r.json(), alone[name])
    assert not calls and base.loads == 5  # 2 at start, then a, (b, b), a reloaded
    app = make_app([runs / "topic-lora-a", runs / "topic-lora-b"], token=None)  # both stay loaded
    base = next(iter(app.state.registry.pool.bases.values()))
    with TestClient(app) as c:
        for name in ("topic-lora-a", "topic-lora-b") * 2:
            r = c.post(f"/models/{name}/predict", json={"inputs": TEXTS[:2], "parameters": {"top_k": 3}})
            assert_rows_match(r.json(), alone[name])
    assert base.loads == 2


@pytest.mark.parametrize("budget", ["count", "memory"])
def test_adapters_over_budget_are_evicted_and_reloaded_with_the_same_answers(runs, budget):
    # Both adapters have the same size: a memory budget of 1.5 of them holds one.
    limit = {"max_adapters": 1} if budget == "count" else {"adapter_memory_mb": 1.5 * _one_adapter_mb(runs)}
    app = make_app([runs / "topic-lora-a", runs / "topic-lora-b"], token=None, **limit)
    base = next(iter(app.state.registry.pool.bases.values()))
    assert len(base.loaded) == 1 and base.loads == 2
    alone = {n: expected_rows(runs / n, TEXTS[:2], top_k=3) for n in ("topic-lora-a", "topic-lora-b")}
    with TestClient(app) as c:
        for name in ("topic-lora-a", "topic-lora-b", "topic-lora-a", "topic-lora-b"):
            r = c.post(f"/models/{name}/predict", json={"inputs": TEXTS[:2], "parameters": {"top_k": 3}})
            assert_rows_match(r.json(), alone[name])
            assert list(base.loaded) == [app.state.registry.get(name).runner.adapter]
    assert base.loads == 6  # every switch reloaded the evicted adapter
    stats = c.app.state.registry.pool.stats()["bases"][0]
    assert stats["adapters_loaded"] == 1 and 0 < stats["adapter_mb"] <= 1.01 * _one_adapter_mb(runs)


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


def test_specialists_on_one_base_share_one_forward_each_row_through_its_adapter(runs, tmp_path):
    shutil.copytree(runs / "topic-probe", tmp_path / "probe-2")
    names = ["topic-probe", "probe-2", "topic-lora-a", "topic-lora-b"]
    folders = {n: runs / n for n in names} | {"probe-2": tmp_path / "probe-2"}
    registry = make_app(list(folders.values()), token=None).state.registry
    served = [registry.get(n) for n in names]
    batcher = served[0]._classify_batcher
    assert all(s._classify_batcher is batcher for s in served)

    async def burst():
        return await asyncio.gather(*[s.classify([t], top_k=3) for t in TEXTS for s in served])

    answers = asyncio.run(burst())
    assert batcher.batches_run == 1  # 20 requests to 4 specialists (2 adapters, 2 heads): one forward
    alone = {n: expected_rows(folders[n], TEXTS, top_k=3) for n in names}
    assert_rows_match([a[0] for a in answers], [alone[n][t] for t in range(len(TEXTS)) for n in names])


def test_serve_has_an_adapter_budget_by_default(client):
    import inspect

    from headstart.serve.app import serve
    from headstart.serve.pool import BasePool

    assert inspect.signature(serve).parameters["max_adapters"].default == 64 == BasePool().max_adapters
    assert [b.max_adapters for b in client.app.state.registry.pool.bases.values()] == [64] * 2  # text, image


@pytest.mark.parametrize("budget", ["count", "memory"])
def test_a_batch_needing_more_adapters_than_the_budget_runs_in_turns(runs, budget):
    limit = {"max_adapters": 1} if budget == "count" else {"adapter_memory_mb": 1.5 * _one_adapter_mb(runs)}
    registry = make_app([runs / "topic-lora-a", runs / "topic-lora-b", runs / "topic-probe"], token=None,
                        **limit).state.registry
    served = [registry.get(n) for n in ("topic-lora-a", "topic-lora-b", "topic-probe")]

    async def burst():
        return await asyncio.gather(*[s.classify([t], top_k=3) for t in TEXTS[:3] for s in served])

    answers = asyncio.run(burst())
    alone = {s.id: expected_rows(runs / s.id, TEXTS[:3], top_k=3) for s in served}
    assert_rows_match([a[0] for a in answers], [alone[s.id][t] for t in range(3) for s in served])
    assert len(served[0].runner.base.loaded) == 1


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


def test_a_bad_input_fails_only_its_own_request_not_the_shared_batch():
    from headstart.serve.batching import MicroBatcher

    calls = []

    def double(xs):
        calls.append(list(xs))
        if "bad" in xs:
            raise ValueError("cannot read 'bad'")
        return [2 * x for x in xs]

    batcher = MicroBatcher(double, max_batch=8, max_wait_s=0.01)

    async def go():
        return await asyncio.gather(batcher.submit([1, 2]), batcher.submit(["bad", 3]), batcher.submit([4]),
                                    return_exceptions=True)

    first, second, third = asyncio.run(go())
    assert first == [2, 4] and third == [8] and isinstance(second, ValueError)
    assert calls[0] == [1, 2, "bad", 3, 4] and sorted(map(str, calls[1:])) == sorted(["[1, 2]", "[4]", "['bad', 3]"])


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
    from headstart.serve import serve

    for bad in ({"max_adapters": 0}, {"adapter_memory_mb": 0}, {"max_batch": 0}):
        with pytest.raises(ServeError, match="adapter_memory_mb > 0"):
            serve([str(runs / "topic-probe")], **bad)
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
