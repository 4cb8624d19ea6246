"""`/models`, `/models/{id}`, `/models/{id}/predict` (Hugging Face task shapes), `/health`, `/ready`.

    POST /models/trec-ft/predict  {"inputs": "Who wrote Hamlet ?", "parameters": {"top_k": 2}}
      -> [{"label": "HUM", "score": 0.93}, {"label": "ENTY", "score": 0.04}]
    POST /models/ants/predict  (Content-Type: image/jpeg, the photo's bytes)      -> the same shape
    POST /models/ants/predict  (multipart/form-data, one or more files)          -> a list per file
    POST /models/ants/predict  {"inputs": "<base64>" | ["<base64>", ...]}

A single input answers a list of `{"label", "score"}`; a list of inputs answers a list of those lists.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from .errors import ApiError
from .limits import Limits
from .registry import specialist
from .served import Served

router = APIRouter(tags=["models"])

JSON_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/plain", "")
"""Bodies read as JSON: `curl -d` sends form-urlencoded, and a client may omit the type altogether."""


@router.get("/health")
async def health() -> dict[str, str]:
    """Alive (no auth: load balancers probe it)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, Any]:
    """Ready once every specialist is loaded (the registry loads them all at start)."""
    registry = request.app.state.registry
    pool = getattr(registry, "pool", None)  # a registry passed to make_app may have none
    return {"ready": True, "models": len(registry.ids()), **(pool.stats() if pool else {})}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Facts of every served specialist."""
    registry = request.app.state.registry
    describe = getattr(registry, "describe", registry.get)  # a Ray replica describes without loading
    return {"models": [describe(i).facts() for i in registry.ids()]}


@router.get("/models/{specialist_id}")
async def show_model(specialist_id: str, request: Request) -> dict[str, Any]:
    """One specialist's facts, metrics and model card."""
    return (await specialist(request.app.state.registry, specialist_id)).details()


@router.post("/models/{specialist_id}/predict")
async def predict(specialist_id: str, request: Request) -> Any:
    """Top-k labels for a text or an image (or a list of them)."""
    served: Served = await specialist(request.app.state.registry, specialist_id)
    if served.kind != "classifier":
        raise ApiError(400, "wrong_task", f"{served.id} is a {served.task} specialist: predict classifies; "
                                          "use /v1/completions or /v1/chat/completions")
    limits: Limits = request.app.state.limits
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in JSON_TYPES:
        inputs, single, top_k = _from_json(await request.body(), served, limits)
        if served.task == "image-classification":  # base64 strings: decoded off the loop, pixels summed
            whats = [f"input {i}" for i in range(len(inputs))]
            inputs = await limits.decode_off_loop(limits.decode_base64_images, inputs, whats)
    elif media.startswith("image/") or media == "application/octet-stream":
        _need_images(served, media)
        images = await limits.decode_off_loop(limits.decode_images, [await request.body()], ["the body"])
        inputs, single, top_k = images, True, _query_top_k(request)
    elif media == "multipart/form-data":
        inputs, single, top_k = await _from_form(request, served, limits), False, _query_top_k(request)
    else:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {media!r} is not accepted: send JSON, "
                                                      "an image (image/*) or multipart/form-data")
    rows = await served.classify(inputs, top_k)
    return rows[0] if single else rows


def _from_json(body: bytes, served: Served, limits: Limits) -> tuple[list[Any], bool, int]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ApiError(422, "invalid_request", 'the body must be a JSON object with "inputs"')
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ApiError(422, "invalid_parameter", '"parameters" must be an object')
    top_k = parameters.get("top_k")
    top_k = 1 if top_k is None else top_k  # HF: null means the default
    raw = payload["inputs"]
    single = not isinstance(raw, list)
    items = [raw] if single else raw
    if served.task == "text-classification":
        return limits.check_texts(items), single, top_k
    limits.check_batch(items)
    return items, single, top_k  # base64 images: the caller decodes them off the loop


async def _from_form(request: Request, served: Served, limits: Limits) -> list[Any]:
    """Files (images) or `inputs` fields (texts) of a multipart form, in the order sent."""
    try:
        form = await request.form(max_files=limits.max_batch, max_fields=limits.max_batch + 8)
    except ApiError:
        raise
    except Exception:  # python-multipart's and Starlette's parse errors have no common base
        raise ApiError(400, "invalid_multipart", "the multipart body cannot be parsed") from None
    try:
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        texts = [v for k, v in form.multi_items() if k == "inputs" and isinstance(v, str)]
        if served.task == "text-classification":
            return limits.check_texts(texts if texts else [])
        _need_images(served, "multipart/form-data")
        limits.check_batch(files)
        blobs = [await f.read() for f in files]
        return await limits.decode_off_loop(limits.decode_images, blobs, [f"file {i}" for i in range(len(blobs))])
    finally:
        await form.close()


def _need_images(served: Served, media: str) -> None:
    if served.task != "image-classification":
        raise ApiError(415, "unsupported_media_type", f"{served.id} classifies text: send JSON "
                                                      f'{{"inputs": "..."}}, not {media}')


def _query_top_k(request: Request) -> int:
    value = request.query_params.get("top_k", "1")
    try:
        return int(value)
    except ValueError:
        raise ApiError(422, "invalid_parameter", "top_k must be a whole number") from None
