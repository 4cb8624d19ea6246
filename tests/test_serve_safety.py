"""The server's safety: bearer auth and its token file, request limits, bad input answered 4xx (never a
500 or a traceback), unexpected errors answered 500 without detail, and a fuzz of malformed requests."""
from __future__ import annotations

import base64
import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from headstart.serve.app import make_app
from headstart.serve.errors import ServeError
from headstart.serve.limits import Limits
from serve_fixtures import AUTH, TOKEN, client, png_bytes, runs  # noqa: F401  (fixtures are found by name)


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


def test_servers_starting_together_agree_on_one_generated_token(tmp_path):
    import threading

    from headstart.serve.auth import resolve_token

    for attempt in range(10):  # replicas starting at the same moment: none fails, none reads an empty file
        path, barrier, got, failed = tmp_path / f"t{attempt}" / "token", threading.Barrier(8), [], []

        def start():
            barrier.wait()
            try:
                got.append(resolve_token("127.0.0.1", path, say=lambda _: None))
            except Exception as e:  # noqa: BLE001  collected: the assert names it
                failed.append(repr(e))

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not failed and len(got) == 8 and len(set(got)) == 1, (failed, got)
        assert os.stat(path).st_mode & 0o777 == 0o600 and os.listdir(path.parent) == ["token"]


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
    for bad in ({"port": 70000}, {"log_level": "loud"}, {"max_text_chars": 0}, {"max_batch": 0}):
        with pytest.raises(ServeError):
            serve([str(tmp_path)], token_file=str(tmp_path / "t"), **bad)
    assert not (tmp_path / "t").exists()  # a refused start writes no token file


def test_cli_refusals_are_one_line_and_write_no_token(runs, tmp_path):
    from conftest import assert_clean_error, headstart_cli

    token = tmp_path / "token"
    assert_clean_error(headstart_cli("serve", tmp_path / "missing", "--token-file", token), "no such folder")
    assert_clean_error(headstart_cli("serve", runs / "topic-probe", "--host", "0.0.0.0", "--token-file", token),
                       "--allow-remote")
    assert_clean_error(headstart_cli("serve", runs / "topic-probe", "--host", "10.0.0.1", "--no-auth",
                                     "--allow-remote"), "needs auth")
    assert not token.exists()


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
    ("/models/colours/predict", {"content": b"\x89PNG not really", "headers": {"Content-Type": "image/png"}},
     422, "invalid_image"),
    ("/models/colours/predict", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 422, "empty_input"),
    ("/models/colours/predict", {"json": {"inputs": "%%% not base64"}}, 422, "invalid_image"),
    ("/models/colours/predict", {"json": {"inputs": base64.b64encode(b"hello").decode()}}, 422, "invalid_image"),
    ("/models/colours/predict", {"json": {"inputs": 3.5}}, 422, "invalid_input"),
    ("/models/colours/predict?top_k=many", {"content": png_bytes(), "headers": {"Content-Type": "image/png"}},
     422, "invalid_parameter"),
    ("/models/colours/predict", {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
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
    assert error["message"] and "Traceback" not in error["message"] and "\n" not in error["message"]


def test_wrong_method_and_unknown_route_are_json_4xx(client):
    r = client.get("/models/topic-probe/predict", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.get("/no/such/route", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/models/nobody", headers=AUTH)
    assert r.status_code == 404 and "topic-probe" in r.json()["error"]["message"]


def test_limits_on_body_pixels_and_time(runs, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after: make_app sets it
    tight = Limits(max_body_bytes=2000, max_image_pixels=1000, timeout_s=0.2)
    app = make_app([runs / "colours"], token=None, limits=tight)
    with TestClient(app) as c:
        r = c.post("/models/colours/predict", headers={"Content-Type": "image/png"}, content=b"\0" * 5000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        for size in ((40, 40), (100, 100)):  # over the limit; over twice the limit
            r = c.post("/models/colours/predict", headers={"Content-Type": "image/png"}, content=png_bytes(size=size))
            assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
        # Within the limit, though the base's own crop (64 x 64) is larger: PIL's bomb check must not refuse it.
        r = c.post("/models/colours/predict", headers={"Content-Type": "image/png"}, content=png_bytes(size=(20, 20)))
        assert r.status_code == 200, r.text
        batcher = app.state.registry.get("colours")._classify_batcher
        run_batch = batcher.run_batch
        monkeypatch.setattr(batcher, "run_batch", lambda items: (time.sleep(1.0), run_batch(items))[1])
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
             "/models/" + "a" * 300 + "/predict", "/models/topic-probe", "/models", "/ready",
             "/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v2/models/topic-probe/infer"]
    types = ["application/json", "image/png", "image/jpeg", "multipart/form-data; boundary=xx", "text/plain",
             "application/octet-stream", "", "application/x-www-form-urlencoded", "video/mp4"]
    payloads = [lambda: rng.randbytes(rng.randrange(0, 3000)),
                lambda: json.dumps({"inputs": rng.choice([None, 1, [], {}, [[1]], "x" * 30_000, [""], True])}).encode(),
                lambda: json.dumps({"inputs": "ok", "parameters": {"top_k": rng.choice([-1, 0, 1e9, None, "x", [2]])}}).encode(),
                lambda: b'{"inputs": "' + bytes(rng.randrange(256) for _ in range(50)) + b'"}',
                lambda: b"[" * 5000 + b"]" * 5000,
                lambda: b'{"a":' * 5000 + b"1" + b"}" * 5000,
                lambda: b'{"model": "\xff", "input": "x"}',
                lambda: json.dumps({"model": "topic-probe", "input": rng.choice(["x", [""], [[1]], None]),
                                    "messages": rng.choice([None, [], [{"role": "user"}]]), "prompt": 1}).encode(),
                lambda: json.dumps({"inputs": base64.b64encode(rng.randbytes(200)).decode()}).encode()]
    # Every payload kind as JSON to every path first (the random draw alone may miss one), then random.
    sweep = [("post", path, "application/json", payload) for path in paths for payload in payloads]
    draws = [(rng.choice(["post", "post", "post", "get", "put", "delete"]), rng.choice(paths), rng.choice(types),
              rng.choice(payloads)) for _ in range(300)]
    statuses = []
    for method, path, content_type, payload in sweep + draws:
        kwargs = {"headers": {**AUTH, "Content-Type": content_type}}
        if method in ("post", "put"):
            kwargs["content"] = payload()
        r = client.request(method.upper(), path, **kwargs)
        statuses.append(r.status_code)
        assert r.status_code < 500 or r.status_code == 504, (r.status_code, r.text)
        if r.status_code >= 400:
            assert set(r.json()) == {"error"}
    assert sum(400 <= s < 500 for s in statuses) > 200




BAD_BODIES = {
    "invalid UTF-8 in JSON": lambda: b'{"model": "\xff", "inputs": "\xfe"}',
    "a list nested 5000 deep": lambda: b"[" * 5000 + b"]" * 5000,
    "an object nested 5000 deep": lambda: b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "a chunked body over the limit": lambda: (b"x" * 20_000 for _ in range(10)),  # no Content-Length
}


@pytest.mark.parametrize("path", ["/models/clf/predict", "/v1/embeddings", "/v1/chat/completions",
                                  "/v1/completions", "/v2/models/clf/infer"])
@pytest.mark.parametrize("body", list(BAD_BODIES))
def test_bad_bodies_are_a_4xx_on_every_protocol(path, body):
    from serve_fakes import FakeRegistry, FakeServed

    registry = FakeRegistry([FakeServed("clf", "text-classification", "classifier")])
    app = make_app([], token=None, limits=Limits(max_body_bytes=100_000), registry=registry)
    c = TestClient(app, raise_server_exceptions=False)  # answer as a real server does
    r = c.post(path, content=BAD_BODIES[body](), headers={"Content-Type": "application/json"})
    expected = 413 if "chunked" in body else 400
    assert r.status_code == expected, (r.status_code, r.text)
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]  # v2: a string; the others: an object
    assert message and "Traceback" not in message and "parsing" not in message


def test_the_pixel_limit_counts_every_image_of_a_request_and_decodes_off_the_loop(monkeypatch):
    import threading

    from serve_fakes import FakeRegistry, FakeServed

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after: make_app sets it
    registry = FakeRegistry([FakeServed("img", "image-classification", "classifier")])
    c = TestClient(make_app([], token=None, limits=Limits(max_image_pixels=1000), registry=registry))
    decoded_in = []
    real_decode = Limits.decode_images

    def recording(self, blobs, whats):
        decoded_in.append(threading.current_thread() is threading.main_thread())
        return real_decode(self, blobs, whats)

    monkeypatch.setattr(Limits, "decode_images", recording)
    small = png_bytes(size=(20, 20))  # 400 pixels: one fits, three (1200) do not
    b64 = base64.b64encode(small).decode()
    v2 = {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": [b64] * 3}]}
    for many, one in (({"json": {"inputs": [b64] * 3}}, {"json": {"inputs": [b64]}}),
                      ({"files": [("f", ("a.png", small, "image/png"))] * 3},
                       {"files": [("f", ("a.png", small, "image/png"))]})):
        r = c.post("/models/img/predict", **many)
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
        assert c.post("/models/img/predict", **one).status_code == 200
    r = c.post("/v2/models/img/infer", json=v2)
    assert r.status_code == 413 and "1000" in r.json()["error"]
    assert c.post("/models/img/predict", content=small, headers={"Content-Type": "image/png"}).status_code == 200
    assert decoded_in and not any(decoded_in)  # every decode ran in a worker thread
