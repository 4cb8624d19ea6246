"""Bearer-token auth, on by default.

`resolve_token` decides the token at start-up: the one in `--token-file` (or `~/.headstart-token`), or a
new one generated with `secrets` and written there with mode 0600; `no_auth` only on a loopback bind.
`BearerAuth` checks `Authorization: Bearer <token>` on every route but the page, its static files and
the health probes (load balancers and the page's first load carry no token).
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile
from pathlib import Path

from .errors import ServeError
from .limits import _reply

DEFAULT_TOKEN_FILE = Path("~/.headstart-token")
OPEN_PATHS = ("/", "/health", "/favicon.ico")
OPEN_PREFIXES = ("/static/", "/v2/health/")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost": only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token_file: str | Path | None = None, no_auth: bool = False,
                  say=print) -> str | None:
    """The token clients must send (None: no auth, allowed only on a loopback host).

    An existing token file is read (it must be private: mode 0600); a missing one is created with a new
    random token, and `say` tells where it is.
    """
    if no_auth:
        if not is_loopback(host):
            raise ServeError(f"--no-auth binds {host}, which other machines can reach: auth stays on unless "
                             "the server binds a loopback host (127.0.0.1, ::1, localhost)")
        return None
    path = Path(token_file or DEFAULT_TOKEN_FILE).expanduser()
    if path.exists():
        return _read_token(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    if not _publish_token(path, token):  # another process (a Ray replica starting beside us) won: use its token
        return _read_token(path)
    say(f"auth token written to {path} (send it as 'Authorization: Bearer <token>')")
    return token


def _publish_token(path: Path, token: str) -> bool:
    """Put `token` at `path` unless a file is already there (then False).

    The token is written whole to a private temp file (mkstemp: 0600, never readable by others) and then
    hard-linked into place: the link either fails (a file is there) or makes the complete file appear at
    once, so a server starting at the same moment never reads an empty or half-written token."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temp)


def _read_token(path: Path) -> str:
    if not path.is_file():
        raise ServeError(f"token file {path} is not a file")
    if path.stat().st_mode & 0o077:
        raise ServeError(f"token file {path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}); "
                         f"run: chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < 16 or any(ch.isspace() for ch in token):
        raise ServeError(f"token file {path} must hold one token of at least 16 characters, no spaces")
    return token


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class BearerAuth:
    """ASGI middleware: 401 JSON unless the request carries the token (constant-time compare)."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or is_open_path(scope.get("path", "")):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not secrets.compare_digest(given, self.expected):
            return await _reply(send, 401, "unauthorized",
                                "missing or wrong token: send 'Authorization: Bearer <token>'")
        await self.app(scope, receive, send)
