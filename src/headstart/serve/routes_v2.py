"""Open Inference Protocol v2 (KServe / Triton / MLServer's REST API), so the same bundles move to those servers.

    GET  /v2                                 server metadata
    GET  /v2/health/live, /v2/health/ready   liveness / readiness (open: no token, for probes)
    GET  /v2/models/{id}[/versions/{v}]      model metadata: inputs and outputs with datatype and shape
    GET  /v2/models/{id}[/versions/{v}]/ready
    POST /v2/models/{id}[/versions/{v}]/infer

A classifier takes one BYTES input, `text` (UTF-8 strings) or `image` (base64 image files), shape [batch];
it answers `label` (BYTES) and `score` (FP32), shape [batch, k] (k = `parameters.top_k`, default 1), and
`probabilities` (FP32, [batch, classes], in the order of the metadata's `parameters.labels`). A generator
takes `text_input` and answers `text_output` (the names of Triton's generate extension).

    >>> requests.post(url + "/v2/models/trec-ft/infer", headers=auth, json={"inputs": [
    ...     {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Who wrote Hamlet ?"]}]}).json()
    {"model_name": "trec-ft", "model_version": "1",
     "outputs": [{"name": "label", "shape": [1, 1], "datatype": "BYTES", "data": ["HUM"]}, ...]}

Errors are the protocol's shape, `{"error": "<message>"}` with a 4xx status (404 for an unknown model).
The version segment is accepted for compatibility; a bundle has one version, named "1".
"""
from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from .errors import ApiError, route_class
from .limits import Limits
from .openai_shapes import generation_options
from .registry import specialist

log = logging.getLogger("headstart.serve")

VERSION = "1"
CLASSIFIER_OUTPUTS = ("label", "score", "probabilities")
INPUT_NAME = {"text-classification": "text", "image-classification": "image", "text-generation": "text_input"}


def _v2_response(refusal) -> JSONResponse:
    """The protocol's error object: `{"error": "<message>"}` (validation failures are a 400 here)."""
    return JSONResponse({"error": refusal.message}, status_code=400 if refusal.validation else refusal.status)


V2Route = route_class("V2Route", _v2_response)


router = APIRouter(prefix="/v2", route_class=V2Route, tags=["open inference protocol v2"])


def _bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request", message)


def _limits(request: Request) -> Limits:
    return getattr(request.app.state, "limits", None) or Limits()


async def _served(request: Request, model: str, version: str | None = None) -> Any:
    registry = request.app.state.registry
    if model not in registry.ids():
        raise ApiError(404, "unknown_model", f"model {model[:80]!r} is not served; GET /v1/models lists the ids")
    if version is not None and version != VERSION:
        raise ApiError(404, "unknown_version", f"model {model!r} has one version, {VERSION!r}, not {version[:20]!r}")
    return await specialist(registry, model)


def _labels(served: Any) -> list[str]:
    """The classifier's classes in head order (the `probabilities` columns)."""
    if getattr(served, "labels", None):
        return [str(c) for c in served.labels]
    manifest = served.manifest
    classes = manifest.get("classes") or manifest.get("heads", {}).get("default", {}).get("classes") or []
    return [str(c) for c in classes]


# ---- server ----------------------------------------------------------------------------------------------
@router.get("")
async def server_metadata() -> dict[str, Any]:
    from .. import __version__

    return {"name": "headstart", "version": __version__, "extensions": []}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready once the registry is built (every source was read at start-up)."""
    is_ready = getattr(request.app.state, "registry", None) is not None
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


# ---- models ----------------------------------------------------------------------------------------------
def _metadata(served: Any) -> dict[str, Any]:
    task = served.task
    tensor = lambda name, datatype, shape: {"name": name, "datatype": datatype, "shape": shape}  # noqa: E731
    parameters: dict[str, Any] = {"task": task}
    if served.kind == "generator":
        inputs = [tensor("text_input", "BYTES", [1])]
        outputs = [tensor("text_output", "BYTES", [1])]
    else:
        labels = _labels(served)
        parameters["labels"] = labels
        if task == "image-classification":
            parameters["content_type"] = "base64"  # MLServer's word: each BYTES element is a base64 image file
        inputs = [tensor(INPUT_NAME[task], "BYTES", [-1])]
        outputs = [tensor("label", "BYTES", [-1, -1]), tensor("score", "FP32", [-1, -1]),
                   tensor("probabilities", "FP32", [-1, len(labels)])]
    return {"name": served.id, "versions": [VERSION], "platform": "headstart", "inputs": inputs,
            "outputs": outputs, "parameters": parameters}


@router.get("/models/{model}")
async def model_metadata(request: Request, model: str) -> dict[str, Any]:
    return _metadata(await _served(request, model))


@router.get("/models/{model}/versions/{version}")
async def model_version_metadata(request: Request, model: str, version: str) -> dict[str, Any]:
    return _metadata(await _served(request, model, version))


@router.get("/models/{model}/ready")
async def model_ready(request: Request, model: str) -> dict[str, Any]:
    return {"name": (await _served(request, model)).id, "ready": True}


@router.get("/models/{model}/versions/{version}/ready")
async def model_version_ready(request: Request, model: str, version: str) -> dict[str, Any]:
    return {"name": (await _served(request, model, version)).id, "ready": True}


@router.post("/models/{model}/infer")
async def infer(request: Request, model: str, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    return await _infer(request, await _served(request, model), body)


@router.post("/models/{model}/versions/{version}/infer")
async def infer_version(request: Request, model: str, version: str, body: dict[str, Any] = Body(...)):
    return await _infer(request, await _served(request, model, version), body)


# ---- inference -------------------------------------------------------------------------------------------
def _one_input(served: Any, body: dict[str, Any]) -> tuple[list[Any], list[int]]:
    """The request's single BYTES input, checked against the metadata: its flat data and its shape."""
    inputs = body.get("inputs")
    expected = INPUT_NAME[served.task]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"inputs must hold exactly one tensor, named {expected!r}")
    tensor = inputs[0]
    if tensor.get("name") != expected:
        raise _bad(f"input {str(tensor.get('name'))[:40]!r} is unknown: {served.id} takes one input, {expected!r}")
    if tensor.get("datatype") != "BYTES":
        raise _bad(f"input {expected!r} must have datatype BYTES, not {str(tensor.get('datatype'))[:20]!r}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(f"input {expected!r} needs a shape: a list of non-negative integers, e.g. [2]")
    data = _flatten(tensor.get("data"))
    if len(data) != math.prod(shape):
        raise _bad(f"input {expected!r} has shape {shape} ({math.prod(shape)} elements) but {len(data)} data elements")
    if not all(isinstance(x, str) for x in data):
        raise _bad(f"input {expected!r}: every BYTES element must be a string")
    return data, shape


def _flatten(data: Any) -> list[Any]:
    """The protocol allows row-major nested lists or a flat list; both become a flat list."""
    if not isinstance(data, list):
        raise _bad("an input's data must be a list")
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _requested_outputs(body: dict[str, Any], known: tuple[str, ...]) -> list[str]:
    wanted = body.get("outputs")
    if wanted is None:
        return list(known)
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
        raise _bad("outputs must be a list of {\"name\": ...} objects")
    names = [o["name"] for o in wanted]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _bad(f"unknown output {unknown[0][:40]!r}; this model has {', '.join(known)}")
    return names


def _top_k(parameters: dict[str, Any], classes: int) -> int:
    k = parameters.get("top_k", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise _bad("parameters.top_k must be an integer >= 1")
    return min(k, classes)


async def _infer(request: Request, served: Any, body: dict[str, Any]) -> dict[str, Any]:
    limits = _limits(request)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("parameters must be an object")
    data, shape = _one_input(served, body)
    if served.kind == "generator":
        outputs = await _generate(served, data, shape, parameters, body, limits)
    else:
        outputs = await _classify(served, data, shape, parameters, body, limits)
    answer: dict[str, Any] = {"model_name": served.id, "model_version": VERSION, "outputs": outputs}
    if isinstance(body.get("id"), str):
        answer["id"] = body["id"]
    return answer


async def _classify(served: Any, data: list[str], shape: list[int], parameters: dict[str, Any],
                    body: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    labels = _labels(served)
    names = _requested_outputs(body, CLASSIFIER_OUTPUTS)
    k = _top_k(parameters, len(labels))
    if served.task == "image-classification":
        limits.check_batch(data)
        whats = [f"image {i}" for i in range(len(data))]  # decoded off the loop, all pixels counted together
        inputs: list[Any] = await limits.decode_off_loop(limits.decode_base64_images, data, whats)
    else:
        inputs = limits.check_texts(data)
    # Every class's score comes back, so the top-k and the full distribution come from one pass.
    ranked = await limits.within_time(served.classify(inputs, top_k=len(labels)))
    batch = len(inputs)
    columns = {name: i for i, name in enumerate(labels)}
    tensors = {
        "label": ("BYTES", [batch, k], [row[j]["label"] for row in ranked for j in range(k)]),
        "score": ("FP32", [batch, k], [float(row[j]["score"]) for row in ranked for j in range(k)]),
        "probabilities": ("FP32", [batch, len(labels)], [p for row in ranked for p in _in_label_order(row, columns)]),
    }
    return [{"name": n, "datatype": tensors[n][0], "shape": tensors[n][1], "data": tensors[n][2]} for n in names]


def _in_label_order(row: list[dict[str, Any]], columns: dict[str, int]) -> list[float]:
    probabilities = [0.0] * len(columns)
    for item in row:
        probabilities[columns[item["label"]]] = float(item["score"])
    return probabilities


async def _generate(served: Any, data: list[str], shape: list[int], parameters: dict[str, Any],
                    body: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    names = _requested_outputs(body, ("text_output",))
    if len(data) != 1:
        raise _bad("text_input takes one prompt per request (shape [1])")
    prompt = limits.check_texts(data)[0]
    if "seed" in parameters:
        _positive_int(parameters, "seed", 0, minimum=0)
    # The OpenAI routes' one check of generation options (ranges, top_p 0 = the most likely token, the cap).
    options = generation_options({name: parameters.get(name) for name in ("max_tokens", "temperature", "top_p",
                                                                          "seed")}, limits.max_new_tokens)
    text = await limits.within_time(served.complete(prompt, **options))
    return [{"name": n, "datatype": "BYTES", "shape": [1], "data": [text]} for n in names]


def _positive_int(parameters: dict[str, Any], name: str, default: int, minimum: int = 1) -> int:
    value = parameters.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad(f"parameters.{name} must be an integer >= {minimum}")
    return value
