"""The OpenAI-compatible endpoints: exact wire shapes over a fake registry, then the official `openai`
client unchanged against a real uvicorn on 127.0.0.1 serving a tiny-llm sft bundle and a tiny-text probe."""
from __future__ import annotations

import base64
import json
import struct
import time

import pytest
from bundle_fixtures import probe_bundle, sft_bundle, sft_files  # noqa: F401  (fixtures are found by name)
from fastapi.testclient import TestClient
from serve_fakes import ANSWER, fake_app

from headstart.serve.routes_openai import router

USER = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture
def fake():
    app, registry = fake_app(router)
    return TestClient(app), registry


def sse_events(text: str) -> list:
    """The `data:` payloads of an event stream, [DONE] kept as the string."""
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert all(block.startswith("data: ") or not block for block in text.split("\n\n")), text
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def assert_openai_error(response, status: int, code: str, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == code, error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


def test_models_lists_every_specialist(fake):
    client, _ = fake
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["clf", "gen", "img"]
    assert all(m["object"] == "model" and m["owned_by"] == "headstart" and isinstance(m["created"], int)
               for m in body["data"])
    assert client.get("/v1/models/gen").json()["id"] == "gen"
    assert_openai_error(client.get("/v1/models/nope"), 404, "model_not_found", "nope")


def test_chat_completion_shape_usage_and_options(fake):
    client, registry = fake
    body = client.post("/v1/chat/completions", json={"model": "gen", "messages": USER, "max_tokens": 8,
                                                     "temperature": 0, "top_p": 0.5, "seed": 3}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "gen"
    (choice,) = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "logprobs": None,
                      "finish_reason": "stop"}
    use = body["usage"]
    assert use["prompt_tokens"] > 0 and use["completion_tokens"] > 0
    assert use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"]
    prompt, options = registry.get("gen").calls[-1]
    assert prompt == USER
    assert options == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 0.5, "seed": 3}


def test_max_tokens_is_capped_and_defaults_stay_the_generators(fake):
    client, registry = fake
    client.post("/v1/chat/completions", json={"model": "gen", "messages": USER, "max_tokens": 10_000})
    assert registry.get("gen").calls[-1][1] == {"max_new_tokens": 16}  # the server's limit; nothing else sent


def test_chat_stream_is_openais_chunk_format(fake):
    client, _ = fake
    r = client.post("/v1/chat/completions", json={"model": "gen", "messages": USER, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == ANSWER
    last_choice = [c for c in chunks if c["choices"]][-1]["choices"][0]
    assert last_choice["delta"] == {} and last_choice["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_stop_strings_cut_the_answer_streamed_or_not(fake):
    client, _ = fake
    request = {"model": "gen", "messages": USER, "stop": ["\n\n", "zzz"]}
    body = client.post("/v1/chat/completions", json=request).json()
    assert body["choices"][0]["message"]["content"] == "Paris is the capital."
    events = sse_events(client.post("/v1/chat/completions", json={**request, "stream": True}).text)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "Paris is the capital."  # the "\n" before the stop string's second half never leaked


def test_completions_non_stream_and_stream(fake):
    client, registry = fake
    body = client.post("/v1/completions", json={"model": "gen", "prompt": "Capital of France?"}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == ANSWER and body["usage"]["total_tokens"] > 0
    assert registry.get("gen").calls[-1][0] == "Capital of France?"
    events = sse_events(client.post("/v1/completions", json={"model": "gen", "prompt": ["Hi"], "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ANSWER
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["object"] == "text_completion"


def test_a_failure_mid_stream_is_an_error_event_without_internals(fake):
    from headstart.serve.errors import ApiError

    client, registry = fake
    registry.get("gen").fail_stream = True
    events = sse_events(client.post("/v1/chat/completions", json={"model": "gen", "messages": USER,
                                                                   "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and "secret" not in json.dumps(events[-2])
    registry.get("gen").fail_stream = ApiError(504, "timeout", "no text for 60 s")
    events = sse_events(client.post("/v1/chat/completions", json={"model": "gen", "messages": USER,
                                                                   "stream": True}).text)
    assert events[-2]["error"]["code"] == "timeout" and events[-2]["error"]["message"] == "no text for 60 s"


@pytest.mark.parametrize("stream", [False, True])
def test_refusals_and_failures_while_answering_keep_the_openai_shape(fake, stream):
    from headstart.core.errors import DataError
    from headstart.serve.errors import ApiError

    client, registry = fake
    request = {"model": "gen", "messages": USER, "stream": stream}
    registry.get("gen").fail_with = ApiError(413, "text_too_long", "the messages exceed 9 characters")
    assert_openai_error(client.post("/v1/chat/completions", json=request), 413, "text_too_long", "exceed 9")
    registry.get("gen").fail_with = DataError("bad input\nsecond line")
    assert_openai_error(client.post("/v1/chat/completions", json=request), 422, "invalid_input", "bad input")
    registry.get("gen").fail_with = RuntimeError("secret internal detail")
    error = assert_openai_error(client.post("/v1/chat/completions", json=request), 500, "internal")
    assert "secret" not in error["message"]


def test_embeddings_float_and_base64(fake):
    client, registry = fake
    body = client.post("/v1/embeddings", json={"model": "clf", "input": ["ab", "abcd"]}).json()
    assert body["object"] == "list" and body["model"] == "clf"
    assert [d["embedding"] for d in body["data"]] == [[2.0, 0.5, -1.0], [4.0, 0.5, -1.0]]
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] == 2
    one = client.post("/v1/embeddings", json={"model": "clf", "input": "abc", "encoding_format": "base64"}).json()
    raw = base64.b64decode(one["data"][0]["embedding"])
    assert struct.unpack("<3f", raw) == (3.0, 0.5, -1.0)


@pytest.mark.parametrize("path, request_body, status, code, needle", [
    ("/v1/chat/completions", {"model": "nope", "messages": USER}, 404, "model_not_found", "nope"),
    ("/v1/chat/completions", {"model": "clf", "messages": USER}, 400, "model_not_generator", "not a text generator"),
    ("/v1/completions", {"model": "img", "prompt": "x"}, 400, "model_not_generator", "image-classification"),
    ("/v1/chat/completions", {"model": "gen", "messages": []}, 400, "invalid_request", "non-empty"),
    ("/v1/chat/completions", {"model": "gen"}, 400, "invalid_request", "messages"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_role", "wizard"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "invalid_role", "tool"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "unsupported_content", "image_url"),
    ("/v1/chat/completions", {"model": "gen", "messages": USER, "n": 2}, 400, "unsupported_parameter", "n=2"),
    ("/v1/chat/completions", {"model": "gen", "messages": USER, "tools": [{}]}, 400, "unsupported_parameter",
     "tools"),
    ("/v1/chat/completions", {"model": "gen", "messages": USER, "temperature": 5}, 400, "invalid_request",
     "temperature"),
    ("/v1/chat/completions", {"model": "gen", "messages": USER, "stop": ["a"] * 5}, 400, "invalid_request", "stop"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "x" * 201}]}, 413,
     "input_too_long", "200"),
    ("/v1/completions", {"model": "gen", "prompt": ["a", "b"]}, 400, "unsupported_parameter", "one prompt"),
    ("/v1/completions", {"model": "gen", "prompt": "x", "stream": "yes"}, 400, "invalid_request", "stream"),
    ("/v1/completions", {"model": "gen", "prompt": "x", "echo": True}, 400, "unsupported_parameter", "echo"),
    ("/v1/embeddings", {"model": "gen", "input": "x"}, 400, "model_not_embedding", "text-generation"),
    ("/v1/embeddings", {"model": "clf", "input": ["a"] * 5}, 413, "batch_too_large", "at most 4"),
    ("/v1/embeddings", {"model": "clf", "input": [""]}, 400, "invalid_request", "empty"),
    ("/v1/embeddings", {"model": "clf", "input": [[1, 2]]}, 400, "invalid_request", "token ids"),
    ("/v1/embeddings", {"model": "clf", "input": "a", "dimensions": 2}, 400, "unsupported_parameter", "dimensions"),
])
def test_bad_requests_get_openai_errors(fake, path, request_body, status, code, needle):
    client, _ = fake
    assert_openai_error(client.post(path, json=request_body), status, code, needle)


def test_malformed_json_and_non_object_bodies(fake):
    client, _ = fake
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_request", "JSON")
    assert_openai_error(client.post("/v1/embeddings", json=[1, 2]), 400, "invalid_request")


# ---- the real app, the official client ---------------------------------------------------------------

TOKEN = "test-token-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the colour of snow?"}]


@pytest.fixture(scope="module")
def real_app(sft_bundle, probe_bundle):
    from headstart.serve.app import make_app
    from headstart.serve.limits import Limits

    return make_app([sft_bundle, probe_bundle], token=TOKEN, limits=Limits(max_new_tokens=8))


@pytest.fixture(scope="module")
def openai_client(real_app):
    """The official client, unchanged, on a real uvicorn at 127.0.0.1 (stopped after the module)."""
    import httpx
    import openai
    from serve_fakes import serving

    with serving(real_app) as url, httpx.Client(trust_env=False, timeout=60) as http:
        yield openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def direct_answer(sft_bundle):
    """What the bundle answers greedily in-process, to compare with what the server sends."""
    import headstart

    spec = headstart.load(sft_bundle)
    return lambda prompt, n: spec.generate(prompt, temperature=0, max_new_tokens=n)


def test_full_app_routes_and_auth(real_app):
    client = TestClient(real_app)
    assert client.get("/v1/models").status_code == 401  # the token is required here...
    assert client.get("/v2/health/live").status_code == 200  # ...but not on the protocol's probes
    ids = [m["id"] for m in client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["data"]]
    assert ids == ["sft", "spec"]
    created = client.get("/v1/models/sft", headers={"Authorization": f"Bearer {TOKEN}"}).json()["created"]
    assert abs(created - time.time()) < 3600  # when the bundle was written, in Unix seconds


def test_openai_client_chat_non_stream_and_stream(openai_client, direct_answer):
    expected = direct_answer(QUESTION, 6)
    reply = openai_client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=6, temperature=0)
    assert reply.model == "sft" and reply.object == "chat.completion"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 <= reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(openai_client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=6, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_openai_client_completions(openai_client, direct_answer):
    prompt = "What is the colour of coal?"
    reply = openai_client.completions.create(model="sft", prompt=prompt, max_tokens=5, temperature=0)
    assert reply.choices[0].text == direct_answer(prompt, 5)
    assert reply.usage.prompt_tokens > 0


def test_openai_client_embeddings(openai_client):
    texts = ["goal team match", "pizza soup bread"]
    floats = openai_client.embeddings.create(model="spec", input=texts, encoding_format="float")
    packed = openai_client.embeddings.create(model="spec", input=texts, encoding_format="base64")
    assert [d.index for d in floats.data] == [0, 1] and floats.usage.prompt_tokens > 0
    vectors = [d.embedding for d in floats.data]
    assert len(vectors[0]) == len(vectors[1]) > 1 and vectors[0] != vectors[1]
    for a, b in zip(vectors, (d.embedding for d in packed.data)):  # asked for base64, the client hands it over
        decoded = struct.unpack(f"<{len(a)}f", base64.b64decode(b))
        assert decoded == pytest.approx(a, rel=1e-6, abs=1e-6)  # float32 on the wire either way
    single = openai_client.embeddings.create(model="spec", input=texts[0])  # the client's default encoding
    assert single.data[0].embedding == pytest.approx(vectors[0], rel=1e-4, abs=1e-5)


def test_openai_client_raises_its_own_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError, match="nope"):
        openai_client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="not a text generator"):
        openai_client.chat.completions.create(model="spec", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="n=3"):
        openai_client.chat.completions.create(model="sft", messages=QUESTION, n=3)
    with pytest.raises(openai.AuthenticationError):
        openai_client.with_options(api_key="wrong-token-0123456789").models.list()
