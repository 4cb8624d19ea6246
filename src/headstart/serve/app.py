"""The app and the function `headstart serve` runs.

    from headstart.serve import make_app, serve
    app = make_app(["runs/trec-ft"], token="s3cret")                 # a FastAPI app (tests, ASGI hosts)
    serve(["runs/trec-ft", "hub/"], port=8080)                       # uvicorn on 127.0.0.1:8080

Every route but the page, its static files and the health probes needs `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from .auth import BearerAuth, is_loopback, resolve_token
from .errors import ServeError, install_error_handlers
from .limits import DEFAULT_MAX_ADAPTERS, BodyLimit, Limits

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
OPTIONAL_ROUTERS = ("routes_openai", "routes_v2", "page")
"""Routers other modules provide (OpenAI, Open Inference Protocol v2, the page): included when present."""


def make_app(sources: list[str | Path], *, token: str | None, limits: Limits | None = None,
             max_adapters: int | None = DEFAULT_MAX_ADAPTERS, adapter_memory_mb: float | None = None,
             max_batch: int = 32, max_wait_ms: float = 5.0, registry: Any = None) -> Any:
    """A FastAPI app serving every specialist the sources hold.

    sources: bundle, lineage and hub folders.
    token: the bearer token every protected route needs; None: no auth.
    limits: the per-request limits (default: `Limits()`).
    max_adapters: most LoRA adapters kept injected per base (64 by default; None: no budget); the least
        recently used is deleted and reloaded when needed.
    adapter_memory_mb: most MB of LoRA adapter weights kept injected per base (None: no memory budget);
        evicts the same way.
    max_batch: most inputs one micro-batch runs together.
    max_wait_ms: longest a request waits for others to share its batch.
    registry: an already built registry (tests pass fakes); then `sources` is not read.
    """
    from fastapi import FastAPI

    from .pool import BasePool
    from .registry import Registry

    limits = limits or Limits()
    limits.apply_to_pil()
    if registry is None:
        registry = Registry(sources, limits=limits, pool=BasePool(max_adapters, adapter_memory_mb),
                            max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
    app = FastAPI(title="headstart", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.state.limits = limits
    app.state.auth = token is not None
    install_error_handlers(app)
    from .routes_models import router

    app.include_router(router)
    for name in OPTIONAL_ROUTERS:
        if importlib.util.find_spec(f"{__package__}.{name}") is not None:
            app.include_router(importlib.import_module(f"{__package__}.{name}").router)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(BearerAuth, token=token)  # added last = outermost: no body is read before auth
    return app


def serve(sources: list[str], host: str = "127.0.0.1", port: int = 8080, token_file: str | None = None,
          no_auth: bool = False, allow_remote: bool = False, max_adapters: int | None = DEFAULT_MAX_ADAPTERS,
          adapter_memory_mb: float | None = None, max_batch: int = 32, max_wait_ms: float = 5.0, max_inputs: int = 64,
          max_body_mb: float = 16.0,
          max_text_chars: int = 20_000, max_image_pixels: int = 24_000_000, timeout_s: float = 60.0, max_new_tokens: int = 512,
          log_level: str = "info", ray: bool = False, replicas: int = 1) -> None:
    """Serve specialists over HTTP: predict, OpenAI-compatible, Open Inference Protocol v2, and a page to try them.

    sources: bundle, lineage and hub folders; every specialist in them is served under its id.
    host: the address to bind (a loopback one unless --allow-remote).
    port: the port to listen on.
    token_file: the bearer token's file (default ~/.headstart-token; created with a new token, mode 0600, if missing).
    no_auth: serve without a token (only on a loopback host).
    allow_remote: allow binding a non-loopback host (auth stays on).
    max_adapters: most LoRA adapters kept loaded per base, 64 by default (least recently used ones are
        deleted, and reloaded when asked); None: no budget.
    adapter_memory_mb: most MB of LoRA adapter weights kept loaded per base, evicted the same way (default:
        no memory budget, only max_adapters).
    max_batch: most inputs run together in one micro-batch.
    max_wait_ms: longest a request waits for others to join its micro-batch.
    max_inputs: most inputs one request may carry.
    max_body_mb: largest request body, in MB.
    max_text_chars: longest text input, in characters.
    max_image_pixels: most pixels of all the images of one request together, width x height summed.
    timeout_s: longest a request may take before a 504.
    max_new_tokens: most tokens one generation may produce.
    log_level: uvicorn's log level (critical, error, warning, info, debug).
    ray: serve through Ray Serve (a local Ray; its proxy on host:port): each replica loads specialists on demand.
    replicas: Ray Serve replicas (with --ray), each with its own copy of the bases.
    """
    import uvicorn

    if log_level not in LOG_LEVELS:
        raise ServeError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if not 0 <= port <= 65535:
        raise ServeError(f"port must be between 0 and 65535, got {port}")
    if not is_loopback(host) and not allow_remote:
        raise ServeError(f"{host} is reachable from other machines: pass allow_remote=True (--allow-remote) to "
                         "bind it, or bind 127.0.0.1")
    if allow_remote and no_auth:
        raise ServeError("--allow-remote needs auth: drop --no-auth")
    try:
        limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_text_chars=max_text_chars,
                        max_image_pixels=max_image_pixels, max_batch=max_inputs, timeout_s=timeout_s,
                        max_new_tokens=max_new_tokens)
    except ValueError as e:
        raise ServeError(str(e)) from None
    if max_batch < 1 or max_wait_ms < 0 or (max_adapters is not None and max_adapters < 1) or \
            (adapter_memory_mb is not None and not adapter_memory_mb > 0):
        raise ServeError("need max_batch >= 1, max_wait_ms >= 0, max_adapters >= 1 and adapter_memory_mb > 0")
    if replicas < 1:
        raise ServeError(f"replicas must be at least 1, got {replicas}")
    from .registry import find_specialists

    find_specialists(sources)  # a missing or foreign folder is refused before a token file is written
    token = resolve_token(host, token_file, no_auth)
    if ray:  # the same app in Ray Serve replicas (serve/ray_app.py); each reads the token file itself
        try:
            from .ray_app import run_on_ray
        except ImportError as e:
            raise ServeError(f"--ray needs Ray Serve (pip install 'ray[serve]'): {e}") from None
        return run_on_ray(sources, host=host, port=port, replicas=replicas, token_file=token_file,
                          no_auth=no_auth, max_adapters=max_adapters, adapter_memory_mb=adapter_memory_mb,
                          max_batch=max_batch,
                          max_wait_ms=max_wait_ms, limits=dataclasses.asdict(limits))
    logging.basicConfig(level=logging.INFO)
    app = make_app(sources, token=token, limits=limits, max_adapters=max_adapters,
                   adapter_memory_mb=adapter_memory_mb, max_batch=max_batch, max_wait_ms=max_wait_ms)
    print(f"serving {len(app.state.registry.ids())} specialist(s) on http://{host}:{port}/ "
          f"({'auth on' if token else 'no auth'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
