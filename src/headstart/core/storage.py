"""Where headstart keeps what it can recompute: features, dequantised bases, file hashes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$HEADSTART_CACHE` (default `~/.cache/headstart`) joined with `parts`, created."""
    root = Path(os.environ.get("HEADSTART_CACHE", Path.home() / ".cache" / "headstart")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, memoised in the cache by (path, size, mtime).

    Hashing a 500 MB dequantised LLM takes seconds; the memo makes it free after the first time.
    """
    path = Path(path).resolve()
    st = path.stat()
    memo_file = cache_dir("hashes") / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
            if all(memo.get(k) == v for k, v in key.items()):
                return memo["sha256"]
        except (ValueError, KeyError):
            pass  # a torn memo is just recomputed
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    atomic_write_text(memo_file, json.dumps({**key, "sha256": digest}))
    return digest


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
