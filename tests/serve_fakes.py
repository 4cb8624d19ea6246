"""A fake registry with the server's documented `Served` interface, for router tests that need no model,
and `serving`, a real uvicorn on 127.0.0.1 that always stops by itself.

The routers under test see only `app.state.registry` (ids / get) and `app.state.limits`; these fakes
answer deterministically so the wire format (OpenAI, Open Inference Protocol v2) is checked exactly.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

from fastapi import FastAPI

from headstart.serve.limits import Limits

ANSWER = "Paris is the capital.\n\nAsk more."
PIECES = ["Paris", " is the", " capital", ".\n", "\nAsk", " more."]
LABELS = ["sport", "food", "tech"]


class FakeServed:
    def __init__(self, id: str, task: str, kind: str):
        self.id, self.task, self.kind = id, task, kind
        self.manifest = {"classes": LABELS} if kind == "classifier" else {"task": "sft"}
        self.card = ""
        self.calls: list[tuple[Any, dict]] = []
        self.fail_stream: bool | Exception = False
        self.fail_with: Exception | None = None
        """Raised by classify / embed / complete, and by `stream` when called (before any piece)."""

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def facts(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task}

    async def classify(self, inputs: list, top_k: int) -> list[list[dict[str, Any]]]:
        self.calls.append((inputs, {"top_k": top_k}))
        self._maybe_fail()
        # "tech" first, then "food", then "sport": a fixed ranking whose scores sum to 1
        ranked = [{"label": "tech", "score": 0.7}, {"label": "food", "score": 0.2}, {"label": "sport", "score": 0.1}]
        return [ranked[:top_k] for _ in inputs]

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append((texts, {}))
        self._maybe_fail()
        return [[float(len(t)), 0.5, -1.0] for t in texts]

    async def complete(self, prompt: Any, **options: Any) -> str:
        self.calls.append((prompt, options))
        self._maybe_fail()
        return ANSWER

    def stream(self, prompt: Any, **options: Any):
        """Like the real one: refusals are raised when called, the pieces come when iterated."""
        self.calls.append((prompt, options))
        self._maybe_fail()
        return self._pieces()

    async def _pieces(self):
        for i, piece in enumerate(PIECES):
            if self.fail_stream and i == 2:  # True: an unexpected failure; an exception: that one
                raise self.fail_stream if isinstance(self.fail_stream, Exception) else RuntimeError("secret detail")
            yield piece


class FakeRegistry:
    def __init__(self, served: list[FakeServed]):
        self.served = {s.id: s for s in served}

    def ids(self) -> list[str]:
        return sorted(self.served)

    def get(self, id: str) -> FakeServed:
        return self.served[id]


def fake_app(router, limits: Limits | None = None) -> tuple[FastAPI, FakeRegistry]:
    """An app holding only `router`, over a text classifier `clf`, an image classifier `img` and a generator `gen`."""
    registry = FakeRegistry([FakeServed("clf", "text-classification", "classifier"),
                             FakeServed("img", "image-classification", "classifier"),
                             FakeServed("gen", "text-generation", "generator")])
    app = FastAPI()
    app.include_router(router)
    app.state.registry = registry
    app.state.limits = limits or Limits(max_text_chars=200, max_batch=4, max_new_tokens=16)
    return app, registry


@contextlib.contextmanager
def serving(app, max_life_s: float = 300.0, startup_timeout: float = 60.0) -> Iterator[str]:
    """`app` on uvicorn at 127.0.0.1 on a free port, in a thread; yields its base URL.

    It stops on exit, and by itself after `max_life_s` whatever the test does (a timer asks it to exit)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks the port; uvicorn serves this very socket (no race)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    watchdog = threading.Timer(max_life_s, lambda: setattr(server, "should_exit", True))
    watchdog.daemon = True
    thread.start()
    watchdog.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            assert thread.is_alive(), "the server stopped while starting"
            assert time.monotonic() < deadline, f"the server did not start in {startup_timeout} s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        watchdog.cancel()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop within 30 s"
