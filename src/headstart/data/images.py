"""Image folders: find files, check each one once, decode on demand.

A file is skipped (and counted, with the reason) when PIL cannot open it, when it is not an
image, or when it is a placeholder: a rendered "image not found" graphic or a blank frame has
a few dozen colours, a photo thousands. hymenoptera's train set holds such a GIF labelled
"ants"; training on it teaches the head noise.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PLACEHOLDER_MAX_COLOURS = 48
"""A 64x64 thumbnail with fewer distinct colours than this is a placeholder, not a photo."""


def list_class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_image(path: Path, skip_placeholders: bool = True) -> str | None:
    """Return why `path` is unusable, or None when it is a usable image."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({path.suffix or 'no suffix'})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the decode below is the real test
            with Image.open(path) as im:
                im.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, so the scan costs ~1 ms a file
                im = im.convert("RGB")
                im.thumbnail((64, 64), Image.NEAREST)  # no smoothing: blending would invent colours
                colours = im.getcolors(1 << 16)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"unreadable ({type(e).__name__})"
    if skip_placeholders and colours is not None and len(colours) < PLACEHOLDER_MAX_COLOURS:
        return f"placeholder or blank image ({len(colours)} colours)"
    return None


def scan_class_folders(root: Path, skip_placeholders: bool = True) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Return (paths, class names per path, skipped (path, reason)) for `<root>/<class>/*`.

    Each file's verdict is remembered in the cache by (path, size, mtime): checking means decoding every
    image, which a re-fit on cached features would otherwise pay each time (0.8 s for hymenoptera's 398).
    """
    paths: list[str] = []
    labels: list[str] = []
    skipped: list[tuple[str, str]] = []
    memo = _VerdictMemo(root, skip_placeholders)
    for class_dir in list_class_folders(root):
        for f in sorted(class_dir.rglob("*")):
            if f.is_dir() or f.name.startswith("."):
                continue
            reason = memo.verdict(f, lambda: check_image(f, skip_placeholders))
            if reason:
                skipped.append((str(f), reason))
            else:
                paths.append(str(f))
                labels.append(class_dir.name)
    memo.save()
    return paths, labels, skipped


class _VerdictMemo:
    """`check_image` verdicts of one folder, kept as JSON in the cache; a file whose size or mtime changed
    is checked again. An unwritable cache only means checking every time."""

    def __init__(self, root: Path, skip_placeholders: bool):
        import hashlib
        import json

        from ..core.storage import cache_dir

        key = hashlib.sha256(f"{Path(root).resolve()}|{skip_placeholders}".encode()).hexdigest()[:32]
        try:
            self.path = cache_dir("image-checks") / f"{key}.json"
            self.known = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):  # unreadable or torn: start afresh
            self.path, self.known = None, {}
        self.changed = False

    def verdict(self, f: Path, check: Callable[[], str | None]) -> str | None:
        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        entry = self.known.get(str(f))
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
            return entry[2] or None
        reason = check()
        self.known[str(f)] = [*stamp, reason or ""]
        self.changed = True
        return reason

    def save(self) -> None:
        if self.changed and self.path is not None:
            import json

            from ..core.storage import atomic_write_text

            try:
                atomic_write_text(self.path, json.dumps(self.known))
            except OSError:
                pass  # a read-only cache: the verdicts are simply computed again next time


def load_image(path: str) -> Image.Image:
    """Decode one image as RGB (the first frame of an animation)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def loader_for(kind: str) -> Callable[[Any], Any]:
    """How one raw example of a base kind is loaded: image paths are decoded, texts pass through."""
    return load_image if kind == "image" else _as_is


def _as_is(x: Any) -> Any:
    return x
