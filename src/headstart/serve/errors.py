"""Errors a client caused, answered as JSON: `{"error": {"code": ..., "message": ...}}` with a 4xx.

Routers raise `ApiError(status, code, message)`. One function, `refusal_for`, maps it, FastAPI's validation
errors, Starlette's HTTP errors (unknown route, wrong method, a body that failed to parse) and the rest to a
`Refusal`; the app's handlers (`install_error_handlers`) and the OpenAI and v2 routers only format it.
Anything unexpected is logged here with its traceback and answered 500 with no detail, so no stack trace,
path or library message ever reaches a client.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from ..core.errors import HeadstartError

log = logging.getLogger("headstart.serve")


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a stable machine `code`, a one-line `message`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class UnknownSpecialist(ApiError):
    """No specialist is served under this id (404)."""

    def __init__(self, specialist_id: str, known: list[str]):
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        super().__init__(404, "unknown_model", f"no specialist {_printable(specialist_id)!r} is served "
                                               f"(served: {shown or 'none'})")


class ServeError(HeadstartError):
    """The server cannot start: a source is unreadable, two sources give one id, auth is unsafe."""


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _printable(text: str, limit: int = 80) -> str:
    """A client-supplied string made safe to echo: printable, short."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


@dataclass
class Refusal:
    """What any error becomes before a protocol formats it: status, machine code, one-line message, field."""

    status: int
    code: str
    message: str
    param: str | None = None
    validation: bool = False
    """FastAPI's validation of the body: the app answers it 422, the OpenAI and v2 protocols 400."""


INTERNAL_MESSAGE = "the server failed to answer this request; its log says why"
_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def refusal_for(exc: BaseException, request: Any = None) -> Refusal:
    """THE mapping of an exception to an answer, shared by the app and the OpenAI and v2 routers.

    FastAPI wraps body-parse failures (invalid UTF-8, JSON nested past the recursion limit, the BodyLimit's
    413 raised while the body streams in) into HTTPException(400) with the cause chained: the cause decides.
    Anything unexpected is logged with its traceback here and answered 500 with no detail."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, HTTPException) and exc.__cause__ is not None:
        cause = exc.__cause__
        if isinstance(cause, (ApiError, RecursionError, UnicodeDecodeError)):
            return refusal_for(cause, request)
    if isinstance(exc, ApiError):
        return Refusal(exc.status, exc.code, exc.message)
    if _is_request_problem(exc):
        return Refusal(exc.status, exc.code, str(exc), exc.param)
    if isinstance(exc, RequestValidationError):
        return _validation_refusal(exc)
    if isinstance(exc, HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return Refusal(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), _printable(detail, 200))
    if isinstance(exc, RecursionError):  # a body nested too deep to parse or walk
        return Refusal(400, "invalid_request", "the request body is nested too deeply")
    if isinstance(exc, UnicodeDecodeError):
        return Refusal(400, "invalid_request", "the request body is not valid UTF-8")
    if isinstance(exc, HeadstartError):  # a problem of the input found while answering
        return Refusal(422, "invalid_input", _printable(" ".join(str(exc).split()), 300))
    where = f" {request.method} {request.url.path}" if request is not None else ""
    log.error("unexpected error answering%s", where, exc_info=(type(exc), exc, exc.__traceback__))
    return Refusal(500, "internal", INTERNAL_MESSAGE)


def _is_request_problem(exc: BaseException) -> bool:
    # openai_shapes.RequestProblem, recognised by its fields so this module does not import the router's.
    return type(exc).__name__ == "RequestProblem" and all(hasattr(exc, a) for a in ("status", "code", "param"))


def _validation_refusal(exc: Any) -> Refusal:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return Refusal(422, "invalid_request", "the request body is not valid JSON", validation=True)
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return Refusal(422, "invalid_request", _printable(f"{where}: {first.get('msg', 'invalid value')}", 200),
                   validation=True)


def main_response(refusal: Refusal) -> Any:
    """The app's own shape: `{"error": {"code", "message"}}`."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(refusal.code, refusal.message), status_code=refusal.status)


def install_error_handlers(app) -> None:
    """Every error leaves the app as `{"error": {...}}` JSON: ApiError, validation, HTTP, unexpected."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def handler(request, exc: Exception):
        return main_response(refusal_for(exc, request))

    for kind in (ApiError, RequestValidationError, HTTPException, HeadstartError, RecursionError, Exception):
        app.add_exception_handler(kind, handler)


def route_class(name: str, answer: Callable[[Refusal], Any]) -> type:
    """A FastAPI route class whose every error leaves through `refusal_for`, shaped by `answer` (a router
    whose protocol has its own error object: OpenAI's, Open Inference v2's)."""
    from fastapi.routing import APIRoute

    class Route(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def handle(request):
                try:
                    return await handler(request)
                except Exception as e:  # noqa: BLE001  every error leaves through the one mapping
                    return answer(refusal_for(e, request))
            return handle

    Route.__name__ = Route.__qualname__ = name
    return Route
