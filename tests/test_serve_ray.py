"""The server as a Ray Serve deployment (serve/ray_app.py): a local single-node Ray, one replica, two tiny
specialists loaded on demand by `@serve.multiplexed`, over HTTP on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

import headstart
from bundle_fixtures import QUIET, sft_bundle, sft_files  # noqa: F401  (fixtures are found by name)
from headstart.serve.errors import ServeError

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

TOKEN = "ray-test-token-0123456789abcdef"
TEXTS = ["goal team match", "pizza soup bread", "laptop code chip", "goal pizza chip"]
WAIT_S = 90
"""Longest any one wait (the deployment starting, a request) may take."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def within(seconds: float, work):
    """`work()` in a thread, waited for at most `seconds` (Ray's own waits have no timeout)."""
    result: dict = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as e:  # handed back to the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def bundles(tiny_text_csv, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-runs")
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", out=root / "topic-probe", **QUIET)
    # A LoRA specialist on the same base: it shares the replica's one base through its adapter.
    headstart.fit(tiny_text_csv, base="tiny-text", method="lora", epochs=1, lr=0.01, head_init="random",
                  seed=1, out=root / "topic-lora", **QUIET)
    return {"topic-probe": root / "topic-probe", "topic-lora": root / "topic-lora"}


def test_ray_replica_serves_each_specialist_as_it_predicts_and_loads_each_once(bundles, tmp_path):
    import httpx
    import ray
    from ray import serve

    from headstart.serve.ray_app import build

    token_file = tmp_path / "token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, TOKEN.encode())
    os.close(fd)
    port = free_port()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build({"sources": [str(p) for p in bundles.values()], "replicas": 1, "token_file": str(token_file),
                     "max_models_per_replica": 4})
        handle = within(WAIT_S, lambda: serve.run(app, name="headstart", route_prefix="/"))
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=WAIT_S) as http:
            assert http.get("/health").json() == {"status": "ok"}
            assert http.get("/models").status_code == 401  # auth as in the main app
            assert http.post("/models/topic-probe/predict", json={"inputs": TEXTS}).status_code == 401
            assert http.post("/models/nope/predict", json={"inputs": TEXTS}, headers=auth).status_code == 404
            # An OpenAI-style request names its specialist in the body: loaded through the multiplexer too.
            vectors = http.post("/v1/embeddings", json={"model": "topic-lora", "input": TEXTS[:2]}, headers=auth)
            assert vectors.status_code == 200, vectors.text
            assert len(vectors.json()["data"]) == 2
            for name, folder in bundles.items():
                want = headstart.load(folder).predict(TEXTS)
                # Twice by the id in the path, once by Ray's header (with another id in the path's place).
                for _ in range(2):
                    rows = http.post(f"/models/{name}/predict", json={"inputs": TEXTS}, headers=auth)
                    assert rows.status_code == 200, rows.text
                    assert [r[0]["label"] for r in rows.json()] == want
                rows = http.post(f"/models/{name}/predict", json={"inputs": TEXTS},
                                 headers={**auth, "serve_multiplexed_model_id": name})
                assert [r[0]["label"] for r in rows.json()] == want
            ready = http.get("/ready", headers=auth).json()
            assert [b["name"] for b in ready["bases"]] == ["tiny-text"]  # one base in the replica, shared
        loads = within(WAIT_S, lambda: handle.loads.remote().result(timeout_s=WAIT_S))
        assert loads["multiplexed"] == {"topic-probe": 1, "topic-lora": 1}
        assert loads["all"] == {"topic-probe": 1, "topic-lora": 1}
        # Room for one specialist per replica: each new id drops the other, which is reloaded when named again.
        app = build({"sources": [str(p) for p in bundles.values()], "token_file": str(token_file),
                     "max_models_per_replica": 1})
        handle = within(WAIT_S, lambda: serve.run(app, name="headstart", route_prefix="/"))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as http:
            for name in ("topic-probe", "topic-lora", "topic-probe"):
                rows = http.post(f"/models/{name}/predict", json={"inputs": TEXTS}, headers=auth)
                assert [r[0]["label"] for r in rows.json()] == headstart.load(bundles[name]).predict(TEXTS)
        loads = within(WAIT_S, lambda: handle.loads.remote().result(timeout_s=WAIT_S))
        assert loads["multiplexed"] == {"topic-probe": 2, "topic-lora": 1}
    finally:
        try:
            within(WAIT_S, serve.shutdown)
        finally:
            ray.shutdown()


def test_plan_refuses_what_the_registry_refuses(bundles, tmp_path):
    from headstart.serve.ray_app import named_specialist
    from headstart.serve.registry import plan_specialists

    assert sorted(plan_specialists(list(bundles.values()))) == ["topic-lora", "topic-probe"]
    with pytest.raises(ServeError, match="two sources give the id"):
        plan_specialists([bundles["topic-probe"], bundles["topic-probe"]])
    with pytest.raises(ServeError, match="no such folder"):
        plan_specialists([tmp_path / "missing"])
    assert named_specialist({"path": "/models/a-b/predict", "headers": []}) == "a-b"
    assert named_specialist({"path": "/v2/models/x/infer", "headers": []}) == "x"
    assert named_specialist({"path": "/v1/chat/completions",
                             "headers": [(b"serve_multiplexed_model_id", b"y")]}) == "y"
    assert named_specialist({"path": "/models", "headers": []}) == ""


def test_the_model_named_in_a_body_is_read_and_the_body_handed_on_whole():
    import asyncio

    from headstart.serve.ray_app import model_in_body

    async def read(messages):
        queue = list(messages)

        async def receive():
            return queue.pop(0)
        model, again = await model_in_body(receive)
        first = await again()
        return model, first

    body = b'{"model": "trec-ft", "input": "x"}'
    parts = [{"type": "http.request", "body": body[:9], "more_body": True},
             {"type": "http.request", "body": body[9:], "more_body": False}]
    assert asyncio.run(read(parts)) == ("trec-ft", {"type": "http.request", "body": body, "more_body": False})
    assert asyncio.run(read([{"type": "http.request", "body": b"[1, 2]"}]))[0] == ""
    assert asyncio.run(read([{"type": "http.request", "body": b"not json"}]))[0] == ""
    assert asyncio.run(read([{"type": "http.disconnect"}])) == ("", {"type": "http.disconnect"})
    for deep in (b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"model": "\xff"}'):
        assert asyncio.run(read([{"type": "http.request", "body": deep}])) == \
            ("", {"type": "http.request", "body": deep, "more_body": False})  # the route refuses it (a 400)


def test_serve_refuses_zero_replicas(bundles):
    from headstart.serve.app import serve as run_server

    with pytest.raises(ServeError, match="replicas must be at least 1"):
        run_server([str(bundles["topic-probe"])], ray=True, replicas=0, no_auth=True)


def test_a_replica_lists_from_manifests_and_forgetting_a_generator_frees_its_adapter(bundles, sft_bundle):
    import asyncio
    import time

    from fastapi.testclient import TestClient

    from headstart.serve.app import make_app
    from headstart.serve.limits import Limits
    from headstart.serve.pool import BasePool
    from headstart.serve.ray_app import ReplicaRegistry

    registry = ReplicaRegistry([bundles["topic-probe"], bundles["topic-lora"], sft_bundle], limits=Limits(),
                               pool=BasePool())
    with TestClient(make_app([], token=None, registry=registry)) as c:
        listed = c.get("/models").json()["models"]
        openai_ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert not registry.loads and not registry.pool.bases  # listing loaded nothing
    assert [m["id"] for m in listed] == registry.ids() == openai_ids
    facts = {m["id"]: m for m in listed}
    assert facts["topic-probe"]["labels"] == headstart.load(bundles["topic-probe"]).classes
    assert facts["topic-probe"]["shares_base"] == "head" and facts["topic-lora"]["shares_base"] == "lora"
    on_loop, real_load = [], registry.load

    def recording_load(specialist_id):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker thread
            on_loop.append(False)
        return real_load(specialist_id)

    registry.load = recording_load
    with TestClient(make_app([], token=None, registry=registry)) as c:
        assert c.get("/v1/models/topic-lora").json()["id"] == "topic-lora" and not on_loop  # facts: no load
        assert c.get("/models/topic-probe").json()["id"] == "topic-probe"  # an unheld id: loaded for the request
    assert on_loop == [False] and registry.loads["topic-probe"] == 1  # ... in a worker thread
    generator_id = next(i for i in registry.ids() if facts[i]["kind"] == "generator")
    for _ in range(2):  # loaded, dropped, loaded again: the shared LM never keeps a dropped adapter
        served = registry.load(generator_id)
        registry.hold(served)
        base, model = served._generator_base, served.generator.model
        name = next(iter(model.peft_config))
        assert any(model is m for m in base.generator_models)
        registry.forget(served)
        deadline = time.monotonic() + 30
        while any(model is m for m in base.generator_models) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(model is m for m in base.generator_models)
        left = [n for n, m in base.backbone.named_modules() if name in getattr(m, "lora_A", {})]
        assert not left, (name, list(model.peft_config), left[:3])
    assert len(registry.pool.bases) == 2 and not base.generator_models  # the text base, the causal LM


def test_forgetting_a_generator_mid_answer_lets_the_answer_end_first(sft_bundle):
    """Answers take turns a token at a time, so Ray dropping a specialist can fall between two tokens of
    one of its answers: the answer still ends whole, then the adapter leaves the shared modules."""
    import asyncio
    import time

    from headstart.serve.limits import Limits
    from headstart.serve.pool import BasePool
    from headstart.serve.ray_app import ReplicaRegistry

    registry = ReplicaRegistry([sft_bundle], limits=Limits(), pool=BasePool())
    generator_id = registry.ids()[0]
    served = registry.load(generator_id)
    registry.hold(served)
    alone = headstart.load(sft_bundle).generate("hello", temperature=0.0, max_new_tokens=12)
    base, model = served._generator_base, served.generator.model

    async def answer_while_forgotten() -> str:
        pieces = []
        async for piece in served.stream("hello", temperature=0.0, max_new_tokens=12):
            if not pieces:
                registry.forget(served)  # Ray's LRU drops it after the first token
            pieces.append(piece)
        return "".join(pieces)

    assert asyncio.run(answer_while_forgotten()) == alone
    deadline = time.monotonic() + 30
    while any(model is m for m in base.generator_models) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(model is m for m in base.generator_models)  # dropped once the answer ended
