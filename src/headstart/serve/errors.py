"""Errors a client caused, answered as JSON: `{"error": {"code": ..., "message": ...}}` with a 4xx.

Routers raise `ApiError(status, code, message)`; the handlers installed by `install_error_handlers` turn
it, FastAPI's validation errors and Starlette's HTTP errors (unknown route, wrong method) into that shape.
Anything unexpected is logged here with its traceback and answered 500 with no detail, so no stack trace,
path or library message ever reaches a client.
"""
from __future__ import annotations

import logging
from typing import Any

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


def install_error_handlers(app) -> None:
    """Every error leaves the app as `{"error": {...}}` JSON: ApiError, validation, HTTP, unexpected."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def reply(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse(error_body(code, message), status_code=status)

    async def api_error(request, exc: ApiError):
        return reply(exc.status, exc.code, exc.message)

    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return reply(422, "invalid_request", _printable(f"{where}: {first.get('msg', 'invalid value')}", 200))

    async def http_error(request, exc: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return reply(exc.status_code, codes.get(exc.status_code, "http_error"), _printable(detail, 200))

    async def user_error(request, exc: HeadstartError):
        # A HeadstartError raised while answering names a problem of the input (labels, data): a 422.
        return reply(422, "invalid_input", _printable(str(exc), 300))

    async def unexpected(request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return reply(500, "internal", "the server failed to answer this request; its log says why")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(HeadstartError, user_error)
    app.add_exception_handler(Exception, unexpected)
