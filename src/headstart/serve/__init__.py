"""The server: many specialists over one loaded base, behind one FastAPI app (docs/SERVE.md).

    from headstart.serve import serve
    serve(["runs/trec-ft", "hub/"], port=8080)          # what `headstart serve` runs

`make_app` builds the app without running it (tests use FastAPI's TestClient on it).
Nothing here is imported by `import headstart`: FastAPI and torch load only when a server starts.
"""
from __future__ import annotations

from typing import Any

__all__ = ["make_app", "serve", "Limits"]


def __getattr__(name: str) -> Any:
    if name in ("make_app", "serve"):
        from . import app

        return getattr(app, name)
    if name == "Limits":
        from .limits import Limits

        return Limits
    raise AttributeError(name)
