"""The page to try a specialist: `GET /` and its three assets under `/static/`.

Plain HTML, CSS and JavaScript from `serve/static/` (package data), no framework and no CDN: the
page works on a machine with no network, and its Content-Security-Policy lets it reach only the
server that served it. Neither route needs the bearer token (the page asks for it, then sends it
on every API call); the files hold no secret.

    app.include_router(page.router)   # make_app does this when the module is there
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"
"""Where the page's files live (shipped as package data)."""

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
"""The only files `/static/` serves, by exact name: a request cannot name any other path."""

SECURITY_HEADERS = {
    # Everything from this origin only; `blob:` for the preview of a dropped image; no inline code.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new server version ships new assets: the browser revalidates instead of mixing old and new.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    """The page itself."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    """One of the page's assets (`app.js`, `style.css`); anything else is a 404."""
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no asset {name!r}")
    return FileResponse(STATIC / name, media_type=f"{ASSETS[name]}; charset=utf-8", headers=SECURITY_HEADERS)
