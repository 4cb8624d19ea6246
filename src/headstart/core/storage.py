"""Where headstart keeps what it can recompute (features, dequantised bases, file hashes), and the one
way it writes files and folders atomically."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


ADAPTER_DIR = "adapter"
"""The folder inside a bundle that holds its default PEFT adapter (methods write it, the bundle layer reads it)."""

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


# --- Atomic writes -------------------------------------------------------------------------------
# One mechanism for every file and folder headstart writes (bundles, checkpoints, merged exports, the
# dequantised-base cache, corrupted datasets), and one recovery rule for a run killed mid-swap.
#
# A folder is replaced in three renames, because rename cannot replace a non-empty folder:
#   1. `folder`              -> `.<name>.old-<pid>-<x>`  (only if `folder` exists)
#   2. `.<name>.tmp-<pid>-<x>` -> `folder`               (the new, complete content)
#   3. `.<name>.old-<pid>-<x>` -> `.<name>.tmp-<pid>-<x>` (then deleted)
# Step 3 renames before deleting, so a half-deleted folder is only ever called `tmp-*`; an `old-*`
# sibling is therefore always a complete previous version. That gives the single recovery rule in
# `recover_interrupted_swap`: if `folder` is missing, the newest `old-*` goes back (a kill between
# steps 1 and 2); if `folder` exists, it wins and `old-*` leftovers are deleted. `tmp-*` leftovers of
# processes that no longer run are deleted either way (a killed dequantisation leaves ~500 MB).

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see `atomic_write_bytes`).

    >>> atomic_write_text(out / "shots.json", json.dumps(result))
    """
    atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_dir(folder: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a folder's new content in a temporary sibling; it becomes `folder` only on success.

    Yields an empty folder on the same filesystem. On a clean exit it is swapped into place (any
    previous `folder`, or a file of that name, is kept as `.<name>.old-<pid>-<x>` until the swap is done);
    on an exception it is removed and `folder` is left as it was. `replace=False` is for caches whose
    content is a function of the name: if another process put `folder` in place first, its copy is
    kept and ours dropped. A kill at any moment leaves either the old or the new folder whole, or one
    that `recover_interrupted_swap` restores.

    >>> with atomic_dir("runs/ants-dark") as tmp:
    ...     (tmp / "CORRUPTION.json").write_text("{}")
    """
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(folder)
    # Unique per call (pid + random), so two writers, even two threads of one process, never share one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary folder
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    try:
        yield tmp
        if not replace and folder.exists():
            return  # another process finished first; `finally` drops our copy
        _swap_in(tmp, folder, old, replace)
    finally:
        _remove(tmp)


def recover_interrupted_swap(folder: str | os.PathLike) -> None:
    """Undo what a kill in the middle of an `atomic_dir` swap left behind (the rule is above).

    Readers call it before looking at `folder` (a bundle, a checkpoint), so a previous version is
    never lost to a kill between "move the old folder aside" and "move the new one in".
    """
    folder = Path(folder).absolute()
    if not folder.parent.is_dir():
        return
    olds = sorted(_leftovers(folder, "old"), key=lambda p: p.stat().st_mtime)
    if not folder.exists() and olds:
        os.replace(olds.pop(), folder)
    for leftover in olds:
        _remove(leftover)
    for leftover in _leftovers(folder, "tmp"):
        if not _pid_alive(_pid_of(leftover, f".{folder.name}.tmp-")):
            _remove(leftover)


def discard_dir(folder: str | os.PathLike) -> None:
    """Delete `folder` and every swap leftover of it (`.<name>.old-*`; `.<name>.tmp-*` of dead processes).

    For folders that are done with (a finished run's checkpoints): nothing of them is left behind.
    """
    folder = Path(folder).absolute()
    _remove(folder)
    if folder.parent.is_dir():
        for leftover in _leftovers(folder, "old"):
            _remove(leftover)
    recover_interrupted_swap(folder)  # with no `old-*` left this only clears dead `tmp-*`


def _swap_in(tmp: Path, folder: Path, old: Path, replace: bool) -> None:
    moved_aside = False
    if folder.exists() or folder.is_symlink():
        os.replace(folder, old)  # step 1
        moved_aside = True
    try:
        os.replace(tmp, folder)  # step 2
    except OSError:
        if moved_aside:
            os.replace(old, folder)  # put the previous version back before reporting the failure
        elif not replace and folder.exists():
            return  # lost a race with another process writing the same cache entry: keep theirs
        raise
    if moved_aside:
        os.replace(old, tmp)  # step 3: never delete under the `old-*` name (see the rule above)
        _remove(tmp)


def _leftovers(folder: Path, kind: str) -> list[Path]:
    prefix = f".{folder.name}.{kind}-"
    return [p for p in folder.parent.glob(f"{glob.escape(prefix)}*") if _pid_of(p, prefix).isdigit()]


def _pid_of(leftover: Path, prefix: str) -> str:
    return leftover.name[len(prefix):].split("-", 1)[0]


def _pid_alive(pid: str) -> bool:
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process, or we cannot tell: leave it
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
