"""Open Inference Protocol v2: health, metadata and infer in the protocol's shapes, over a fake registry,
then real tiny-text, tiny-image and tiny-llm bundles behind the real app."""
from __future__ import annotations

import base64
import io

import pytest
from bundle_fixtures import INPUTS, QUIET, probe_bundle, sft_bundle, sft_files  # noqa: F401  (fixtures by name)
from fastapi.testclient import TestClient
from PIL import Image
from serve_fakes import ANSWER, LABELS, fake_app

from headstart.serve.routes_v2 import router


@pytest.fixture
def fake():
    app, registry = fake_app(router)
    return TestClient(app), registry


def texts(*data: str) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(data)], "datatype": "BYTES", "data": list(data)}]}


def assert_v2_error(response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for needle in needles:
        assert needle in body["error"], body["error"]
    return body["error"]


def test_server_health_and_metadata(fake):
    client, _ = fake
    server = client.get("/v2").json()
    assert server["name"] == "headstart" and isinstance(server["version"], str) and server["extensions"] == []
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_declares_tensors(fake):
    client, _ = fake
    meta = client.get("/v2/models/clf").json()
    assert meta["name"] == "clf" and meta["versions"] == ["1"] and meta["platform"] == "headstart"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "label": ("BYTES", [-1, -1]), "score": ("FP32", [-1, -1]), "probabilities": ("FP32", [-1, 3])}
    assert meta["parameters"]["labels"] == LABELS and meta["parameters"]["task"] == "text-classification"
    assert client.get("/v2/models/img").json()["inputs"][0]["name"] == "image"
    gen = client.get("/v2/models/gen/versions/1").json()
    assert gen["inputs"][0]["name"] == "text_input" and gen["outputs"][0]["name"] == "text_output"
    assert client.get("/v2/models/clf/ready").json() == {"name": "clf", "ready": True}
    assert client.get("/v2/models/clf/versions/1/ready").status_code == 200
    assert_v2_error(client.get("/v2/models/nope"), 404, "nope")
    assert_v2_error(client.get("/v2/models/nope/ready"), 404)
    assert_v2_error(client.get("/v2/models/clf/versions/7"), 404, "one version")


def test_infer_text_outputs_label_score_probabilities(fake):
    client, registry = fake
    body = client.post("/v2/models/clf/infer", json={**texts("a goal", "some soup"), "id": "req-1"}).json()
    assert body["model_name"] == "clf" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"] == {"name": "label", "datatype": "BYTES", "shape": [2, 1], "data": ["tech", "tech"]}
    assert out["score"]["datatype"] == "FP32" and out["score"]["data"] == pytest.approx([0.7, 0.7])
    # in the metadata's label order: sport, food, tech
    assert out["probabilities"]["shape"] == [2, 3]
    assert out["probabilities"]["data"] == pytest.approx([0.1, 0.2, 0.7] * 2)
    assert registry.get("clf").calls[-1] == (["a goal", "some soup"], {"top_k": 3})


def test_infer_top_k_requested_outputs_and_nested_data(fake):
    client, _ = fake
    request = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [["a goal"]]}],
               "parameters": {"top_k": 2}, "outputs": [{"name": "label"}]}
    body = client.post("/v2/models/clf/versions/1/infer", json=request).json()
    assert body["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [1, 2], "data": ["tech", "food"]}]


def test_infer_image_as_base64_bytes(fake):
    client, registry = fake
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    request = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
    body = client.post("/v2/models/img/infer", json=request).json()
    assert {o["name"] for o in body["outputs"]} == {"label", "score", "probabilities"}
    (image,) = registry.get("img").calls[-1][0]
    assert image.size == (8, 6)
    request["inputs"][0]["data"] = [base64.b64encode(b"not an image").decode()]
    assert_v2_error(client.post("/v2/models/img/infer", json=request), 422, "not a readable image")


def test_infer_generator_text_output(fake):
    client, registry = fake
    request = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Capital?"]}],
               "parameters": {"max_tokens": 5, "temperature": 0}}
    body = client.post("/v2/models/gen/infer", json=request).json()
    assert body["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [ANSWER]}]
    assert registry.get("gen").calls[-1] == ("Capital?", {"max_new_tokens": 5, "temperature": 0.0})


def test_generation_options_are_checked_as_the_openai_routes_check_them(fake):
    from types import SimpleNamespace

    from headstart.serve.limits import Limits
    from headstart.serve.served import Served

    client, registry = fake
    prompt = [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Capital?"]}]
    r = client.post("/v2/models/gen/infer", json={"inputs": prompt, "parameters": {"top_p": 0, "max_tokens": 9999}})
    assert r.status_code == 200, r.text
    options = registry.get("gen").calls[-1][1]
    assert options["max_new_tokens"] == 16 and 0 < options["top_p"] <= 1e-6  # 0: the most likely token only
    # The generator's own check (served.py) accepts what the route passes on.
    assert Served._generation_options(SimpleNamespace(limits=Limits()), dict(options))["top_p"] == options["top_p"]
    for bad in ({"top_p": 1.5}, {"temperature": -1}, {"max_tokens": 0}, {"seed": -1}, {"top_p": "x"}):
        assert_v2_error(client.post("/v2/models/gen/infer", json={"inputs": prompt, "parameters": bad}), 400,
                        next(iter(bad)))


@pytest.mark.parametrize("request_body, status, needle", [
    ({"inputs": []}, 400, "exactly one"),
    ({"inputs": [{"name": "words", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400, "'text'"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "BYTES"),
    ({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["x"]}]}, 400, "shape"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "data": ["x"]}]}, 400, "shape"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [3]}]}, 400, "string"),
    ({**texts("x"), "outputs": [{"name": "logits"}]}, 400, "logits"),
    ({**texts("x"), "parameters": {"top_k": 0}}, 400, "top_k"),
    (texts(""), 422, "empty"),
    (texts("x" * 201), 413, "200"),
    (texts(*"abcde"), 413, "limit is 4"),
])
def test_bad_infer_requests_get_protocol_errors(fake, request_body, status, needle):
    client, _ = fake
    assert_v2_error(client.post("/v2/models/clf/infer", json=request_body), status, needle)


def test_failures_while_answering_keep_the_protocol_shape(fake):
    from headstart.core.errors import LabelError

    client, registry = fake
    registry.get("clf").fail_with = LabelError("unknown label")
    assert_v2_error(client.post("/v2/models/clf/infer", json=texts("x")), 422, "unknown label")
    registry.get("clf").fail_with = RuntimeError("secret internal detail")
    message = assert_v2_error(client.post("/v2/models/clf/infer", json=texts("x")), 500)
    assert "secret" not in message


def test_malformed_json_and_unknown_model(fake):
    client, _ = fake
    r = client.post("/v2/models/clf/infer", content=b"{oops", headers={"content-type": "application/json"})
    assert_v2_error(r, 400, "JSON")
    assert_v2_error(client.post("/v2/models/nope/infer", json=texts("x")), 404, "nope")


# ---- the real app over real tiny bundles ---------------------------------------------------------------

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def image_bundle(tiny_image_folder, tmp_path_factory):
    import headstart

    out = tmp_path_factory.mktemp("v2-image") / "shapes"
    headstart.fit(tiny_image_folder, base="tiny-image", method="probe", out=out, **QUIET)
    return out


@pytest.fixture(scope="module")
def real(probe_bundle, image_bundle, sft_bundle):
    from headstart.serve.app import make_app

    return TestClient(make_app([probe_bundle, image_bundle, sft_bundle], token=TOKEN))


def test_real_text_classifier_matches_the_bundle(real, probe_bundle):
    import headstart

    spec = headstart.load(probe_bundle)
    assert real.get("/v2/health/ready").json() == {"ready": True}  # a probe: no token needed
    assert real.get("/v2/models/spec").status_code == 401  # everything else needs it
    meta = real.get("/v2/models/spec", headers=AUTH).json()
    assert meta["parameters"]["labels"] == list(spec.classes)
    body = real.post("/v2/models/spec/infer", headers=AUTH, json=texts(*INPUTS)).json()
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"]["data"] == spec.predict(INPUTS)
    assert out["probabilities"]["data"] == pytest.approx(spec.predict_proba(INPUTS).flatten().tolist(), abs=1e-5)
    assert out["probabilities"]["shape"] == [len(INPUTS), len(spec.classes)]


def test_real_image_classifier_takes_base64_files(real, image_bundle, tiny_image_folder):
    import headstart

    paths = sorted((tiny_image_folder / "val" / "red").glob("*.png"))[:2]
    data = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    request = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": data}],
               "parameters": {"top_k": 2}}
    body = real.post("/v2/models/shapes/infer", headers=AUTH, json=request).json()
    out = {o["name"]: o for o in body["outputs"]}
    expected = headstart.load(image_bundle).predict([str(p) for p in paths])
    assert out["label"]["shape"] == [2, 2] and out["label"]["data"][::2] == expected


def test_real_generator_text_output_matches_the_bundle(real, sft_bundle):
    import headstart

    prompt = "What is the colour of grass?"
    expected = headstart.load(sft_bundle).generate(prompt, temperature=0, max_new_tokens=5)
    request = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [prompt]}],
               "parameters": {"max_tokens": 5, "temperature": 0}}
    body = real.post("/v2/models/sft/infer", headers=AUTH, json=request).json()
    assert body["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [expected]}]
