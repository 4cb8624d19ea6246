"""OpenAI-compatible endpoints: `model` is a specialist id, and the official `openai` client works unchanged.

    GET  /v1/models                  every specialist, as OpenAI model objects
    POST /v1/embeddings              model = a text classifier: its base's features (the sentence embedding)
    POST /v1/completions             model = a generator (sft/dpo bundle); `stream: true` -> Server-Sent Events
    POST /v1/chat/completions        the same with chat messages

    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=token)
    >>> client.chat.completions.create(model="alpaca-lora", messages=[{"role": "user", "content": "Hi"}])

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` with a 4xx status, so the
client raises `openai.BadRequestError` / `NotFoundError` with the message; this router's own route class
(`OpenAIRoute`) converts them, whatever the app-wide handler does for the other routes.
"""
from __future__ import annotations

import calendar
import json
import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..core.errors import HeadstartError
from . import openai_shapes as shapes
from .openai_shapes import RequestProblem

from .errors import ApiError, Refusal, route_class
from .limits import Limits
from .registry import specialist

log = logging.getLogger("headstart.serve")

EMBEDDING_TASKS = ("text-classification", "feature-extraction")


# Errors leave in OpenAI's shape (the client reads `error.message`).
OpenAIRoute = route_class("OpenAIRoute", lambda refusal: _openai_response(refusal))


router = APIRouter(route_class=OpenAIRoute, tags=["openai"])


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse(shapes.error_body(message, code, kind, param), status_code=status)


def _openai_response(refusal: Refusal) -> JSONResponse:
    status = 400 if refusal.validation else refusal.status
    return _error(status, refusal.message, refusal.code, refusal.param)


# ---- look-ups -------------------------------------------------------------------------------------------
def _limits(request: Request) -> Limits:
    return getattr(request.app.state, "limits", None) or Limits()


async def _served(request: Request, model: Any) -> Any:
    """The specialist a request names; unknown ids are a 404 (ids only, never a path)."""
    if not isinstance(model, str) or not model:
        raise RequestProblem("model is required: a specialist id from GET /v1/models", param="model")
    registry = request.app.state.registry
    if model not in registry.ids():
        raise RequestProblem(f"model {model!r} does not exist; GET /v1/models lists the specialists served",
                             "model_not_found", "model", status=404)
    return await specialist(registry, model)


async def _generator(request: Request, model: Any) -> Any:
    served = await _served(request, model)
    if served.kind != "generator":
        raise RequestProblem(f"model {model!r} is a {served.task} specialist, not a text generator; "
                             f"use POST /models/{model}/predict or /v1/embeddings", "model_not_generator", "model")
    return served


def _tokenizer(served: Any) -> Any:
    """The specialist's own tokenizer: a generator's, or a text classifier's base's (None if unreachable)."""
    generator = getattr(served, "generator", None)
    if generator is not None:
        return getattr(generator, "tokenizer", None)
    backbone = getattr(getattr(getattr(served, "runner", None), "model", None), "backbone", None)
    return getattr(backbone, "tokenizer", None)


def _token_counter(served: Any) -> Callable[[str], int]:
    """Counts tokens with the specialist's tokenizer (OpenAI's `usage`); whitespace words when it has none."""
    tokenizer = _tokenizer(served)
    if tokenizer is not None:
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return lambda text: len(text.split())


def _prompt_tokens(served: Any, prompt: str | list[dict], count: Callable[[str], int]) -> int:
    """Tokens of the prompt as the model sees it (chat template applied, assistant turn opened)."""
    tokenizer = _tokenizer(served)
    if tokenizer is None:
        return count(prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt))
    from ..llm.generate import render_prompt
    return count(render_prompt(tokenizer, prompt))


# ---- routes -----------------------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every specialist this server holds, as OpenAI model objects (`id` = specialist id)."""
    registry = request.app.state.registry
    describe = getattr(registry, "describe", registry.get)  # a Ray replica describes without loading
    return {"object": "list", "data": [_model(describe(i)) for i in registry.ids()]}


@router.get("/v1/models/{model_id}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    registry = request.app.state.registry
    if model_id not in registry.ids():
        await _served(request, model_id)  # the 404, in OpenAI's words
    return _model(getattr(registry, "describe", registry.get)(model_id))  # facts only: a Ray replica loads nothing


def _model(served: Any) -> dict[str, Any]:
    """OpenAI's model object; `created` is when the bundle was written (its manifest's UTC stamp), else 0."""
    stamp = served.manifest.get("created")
    try:
        created = int(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        created = 0
    return shapes.model_object(served.id, created)


@router.post("/v1/embeddings")
async def embeddings(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """The text classifier's base features for each input (its head is not applied)."""
    served = await _served(request, body.get("model"))
    if served.task not in EMBEDDING_TASKS:
        raise RequestProblem(f"model {served.id!r} is a {served.task} specialist; embeddings come from text "
                             "classifiers (their base's features)", "model_not_embedding", "model")
    limits = _limits(request)
    texts = shapes.embedding_inputs(body.get("input"), limits.max_text_chars, limits.max_batch)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestProblem("encoding_format must be float or base64", param="encoding_format")
    vectors = await limits.within_time(served.embed(texts))
    dimensions = body.get("dimensions")
    if dimensions is not None and vectors and dimensions != len(vectors[0]):
        raise RequestProblem(f"dimensions={dimensions} is not supported: this model's embeddings have "
                             f"{len(vectors[0])}", "unsupported_parameter", "dimensions")
    count = _token_counter(served)
    return shapes.embedding_response(served.id, vectors, encoding, sum(count(t) for t in texts))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: dict[str, Any] = Body(...)):
    """A chat answer from a generator specialist; `stream: true` sends `chat.completion.chunk` events."""
    served = await _generator(request, body.get("model"))
    shapes.refuse_unsupported(body)
    messages = shapes.chat_messages(body.get("messages"), _limits(request).max_text_chars)
    return await _answer(request, served, body, messages, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, body: dict[str, Any] = Body(...)):
    """A completion from a generator specialist. The prompt is one user turn of the chat template the
    specialist was tuned with (a headstart generator is an instruction model, never raw text continuation)."""
    served = await _generator(request, body.get("model"))
    shapes.refuse_unsupported(body)
    prompt = shapes.completion_prompt(body.get("prompt"), _limits(request).max_text_chars)
    return await _answer(request, served, body, prompt, chat=False)


async def _answer(request: Request, served: Any, body: dict[str, Any], prompt: str | list[dict], *, chat: bool):
    limits = _limits(request)
    options = shapes.generation_options(body, limits.max_new_tokens)
    stops = shapes.stop_strings(body)
    stream_options = body.get("stream_options") or {}
    if body.get("stream") not in (None, True, False):
        raise RequestProblem("stream must be true or false", param="stream")
    if body.get("stream"):
        include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
        # Opened here, before the response starts: a prompt or option the specialist refuses is still a 4xx.
        pieces = served.stream(prompt, **options)
        events = _sse_events(served, pieces, prompt, options, stops, chat=chat, include_usage=include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    cutter = shapes.StopCutter(stops)
    text = cutter.feed(await limits.within_time(served.complete(prompt, **options))) + cutter.flush()
    count = _token_counter(served)
    completion_tokens = count(text)
    finish = _finish_reason(cutter, completion_tokens, options)
    use = shapes.usage(_prompt_tokens(served, prompt, count), completion_tokens)
    rid = shapes.new_id("chatcmpl" if chat else "cmpl")
    build = shapes.chat_response if chat else shapes.text_response
    return build(rid, served.id, text, finish, use)


def _finish_reason(cutter: shapes.StopCutter, completion_tokens: int, options: dict[str, Any]) -> str:
    """`length` when the answer ran into max_tokens, else `stop` (end of turn or a stop string)."""
    return "length" if not cutter.stopped and completion_tokens >= options["max_new_tokens"] else "stop"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse_events(served: Any, pieces: AsyncIterator[str], prompt: str | list[dict], options: dict[str, Any],
                      stops: list[str], *, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: one event per text piece, a last one with the finish reason, then `data: [DONE]`.

    A failure after the response started cannot change its status any more: it is sent as an
    `{"error": ...}` event (as OpenAI does) and the stream ends with [DONE]."""
    rid, created = shapes.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def piece(text: str, finish: str | None = None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
            return _sse(shapes.chat_chunk(rid, served.id, created, delta, finish))
        return _sse(shapes.text_chunk(rid, served.id, created, text, finish))

    cutter, sent = shapes.StopCutter(stops), []
    try:
        if chat:
            yield piece("", first=True)
        try:
            async for text in pieces:
                safe = cutter.feed(text)
                if safe:
                    sent.append(safe)
                    yield piece(safe)
                if cutter.stopped:
                    break
        finally:
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()  # a stop string ended the answer: let the generator stop too
        tail = cutter.flush()
        if tail:
            sent.append(tail)
            yield piece(tail)
        count = _token_counter(served)
        completion_tokens = count("".join(sent))
        yield piece("", _finish_reason(cutter, completion_tokens, options))
        if include_usage:
            use = shapes.usage(_prompt_tokens(served, prompt, count), completion_tokens)
            yield _sse(shapes.usage_chunk(rid, served.id, created, obj, use))
    except Exception as e:  # the status line is gone: report in the stream (OpenAI does the same)
        yield _sse(_stream_error(served, e))
    yield "data: [DONE]\n\n"


def _stream_error(served: Any, e: Exception) -> dict[str, Any]:
    """The error event for a failure mid-stream: a refusal's own message, else nothing internal."""
    if isinstance(e, ApiError):
        return shapes.error_body(e.message, e.code, "invalid_request_error" if e.status < 500 else "server_error")
    if isinstance(e, HeadstartError):
        return shapes.error_body(" ".join(str(e).split())[:300], "invalid_input")
    log.exception("stream for %s failed", served.id)
    return shapes.error_body("generation failed; the server's log says why", "internal", "server_error")
