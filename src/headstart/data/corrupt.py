"""A reproducible domain shift: bright, clean web photos -> blurry, dark, noisy "factory" photos.

Measuring unsupervised domain adaptation needs a labelled source domain and a shifted target
domain with the same classes. This module makes the target from any image folder:

    from headstart.corrupt import corrupt_folder
    corrupt_folder("../shared/data/hymenoptera", "runs/hymenoptera-factory",
                   blur=1.5, dark=0.4, noise=0.05, jpeg=30, seed=0)
    # runs/hymenoptera-factory/{train,val}/{ants,bees}/*.jpg + CORRUPTION.json

Each image gets, in order: Gaussian blur (radius in pixels), darkening (x (1 - dark)), additive
Gaussian noise (std on the [0, 1] scale) and a JPEG round trip (quality 1..95). Output is
byte-identical for the same (source, settings, seed), and each file's noise depends only on its
own relative path, never on which other files exist.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError
from tqdm.auto import tqdm

from .images import IMAGE_SUFFIXES, check_image
from ..core.errors import DataError
from ..core.storage import atomic_dir

# Suffixes written back in their own format, so source and output paths map 1:1. JPEG at quality
# 95 (near-lossless, and the folder stays JPEG-sized); the others losslessly. GIF (a 256-colour
# palette cannot hold noise), PGM (grey only) and anything else become PNG under a new name.
SAVE_AS = {".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}), ".png": ("PNG", {}),
           ".bmp": ("BMP", {}), ".tif": ("TIFF", {}), ".tiff": ("TIFF", {}), ".ppm": ("PPM", {}),
           ".webp": ("WEBP", {"lossless": True})}
MANIFEST = "CORRUPTION.json"


def _check_args(blur: float, dark: float, noise: float, jpeg: int | None) -> None:
    if not blur >= 0:  # `not >=` also rejects NaN
        raise ValueError(f"blur is a Gaussian radius in pixels and must be >= 0, got {blur}")
    if not 0 <= dark < 1:
        raise ValueError(f"dark must be in [0, 1) (0.4 keeps 60% brightness), got {dark}")
    if not noise >= 0:
        raise ValueError(f"noise is a standard deviation on the [0, 1] scale and must be >= 0, got {noise}")
    if jpeg is not None and (isinstance(jpeg, bool) or not isinstance(jpeg, int) or not 1 <= jpeg <= 95):
        raise ValueError(f"jpeg is a JPEG quality and must be an integer in 1..95 (or None), got {jpeg!r}")


def corrupt_image(image: Image.Image, *, blur: float = 0.0, dark: float = 0.0, noise: float = 0.0,
                  jpeg: int | None = None, rng: np.random.Generator) -> Image.Image:
    """Return an RGB copy of `image` blurred, darkened, noised, then JPEG-compressed.

    >>> out = corrupt_image(Image.new("RGB", (32, 32), "white"), dark=0.5, rng=np.random.default_rng(0))
    >>> out.getpixel((0, 0))
    (128, 128, 128)
    """
    _check_args(blur, dark, noise, jpeg)
    im = image.convert("RGB")  # always a copy: the caller's image is never modified
    if blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    if dark > 0 or noise > 0:  # skip the float round trip when it cannot change anything
        a = np.asarray(im, dtype=np.float64) / 255.0
        a *= 1.0 - dark
        if noise > 0:
            a += rng.normal(0.0, noise, a.shape)  # per channel: sensor noise is not grey
        im = Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")
    if jpeg is not None:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=jpeg)
        buf.seek(0)
        with Image.open(buf) as decoded:
            im = decoded.convert("RGB")
    return im


def _file_rng(seed: int, rel: str) -> np.random.Generator:
    # sha256, not hash(): Python salts str hashes per process, which would break reproducibility.
    key = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, key])


def _plan(source: Path) -> list[tuple[Path, Path | None]]:
    """(relative source path, relative output path or None to copy) for every visible file."""
    files = sorted(p.relative_to(source) for p in source.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts))
    taken = {str(f).lower() for f in files}
    plan = []
    for rel in files:
        suffix = rel.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            plan.append((rel, None))
        elif suffix in SAVE_AS:
            plan.append((rel, rel))
        else:  # x.gif -> x.png, or x.gif.png if the folder already holds an x.png
            png = rel.with_suffix(".png")
            plan.append((rel, png if str(png).lower() not in taken else rel.with_name(rel.name + ".png")))
    return plan


def _version() -> str:
    import headstart

    if getattr(headstart, "__version__", None):
        return headstart.__version__
    from importlib.metadata import version

    return version("headstart")


def corrupt_folder(source: str | Path, out: str | Path, *, blur: float = 0.0, dark: float = 0.0,
                   noise: float = 0.0, jpeg: int | None = None, seed: int = 0, progress: bool = True,
                   overwrite: bool = False, skip_placeholders: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Write a corrupted mirror of the image folder `source` to `out`; return its CORRUPTION.json.

    Every image under `source` (any depth) is corrupted with `corrupt_image` and saved under the
    same relative path (GIF/PGM/other odd formats as .png, listed under "renamed"); other files
    (SOURCE.md, tables) are copied unchanged; hidden files are left out; files PIL cannot decode
    are skipped and listed. `out` appears atomically: it is built in a hidden sibling folder and
    renamed into place, so an interrupted run never leaves a half-written dataset.

    Placeholders (an "image not found" graphic: few colours) are skipped as `load_dataset` skips them --
    noise would give them thousands of colours and smuggle them into the corrupted dataset;
    `skip_placeholders=False` corrupts them too (digits, line art: load those with --keep-placeholders).

    >>> info = corrupt_folder("data/ants", "data/ants-dark", dark=0.4, noise=0.05, seed=1)
    corrupted 397 images -> data/ants-dark (skipped 0)
    """
    _check_args(blur, dark, noise, jpeg)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    src, dst = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.is_dir():
        raise DataError(f"no such image folder: {source}")
    if dst == src or src in dst.parents:
        raise DataError(f"{out} is inside the source folder {source}: choose an output folder outside it")
    if dst in src.parents:  # overwrite would delete the source along with the old output
        raise DataError(f"{out} contains the source folder {source}: choose another output folder")
    if dst.exists() and (dst.is_file() or any(dst.iterdir())) and not overwrite:
        raise DataError(f"{out} already exists and is not empty: pass overwrite=True (--overwrite) to replace it")

    plan = _plan(src)
    with atomic_dir(dst) as tmp:
        info = _write_corrupted(src, tmp, plan, blur=blur, dark=dark, noise=noise, jpeg=jpeg, seed=seed,
                                progress=progress, skip_placeholders=skip_placeholders)
    log(f"corrupted {info['images']} images -> {out} (skipped {len(info['skipped'])})")
    return info


def _write_corrupted(src: Path, tmp: Path, plan: list[tuple[Path, Path | None]], *, blur: float, dark: float,
                     noise: float, jpeg: int | None, seed: int, progress: bool, skip_placeholders: bool) -> dict:
    """Corrupt or copy every planned file from `src` into `tmp`; return the CORRUPTION.json content."""
    def work(item: tuple[Path, Path | None]) -> tuple[str, Path, Path | None, str | None]:
        rel, target = item
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if target is None:
            shutil.copyfile(src / rel, tmp / rel)
            return "copied", rel, None, None
        if skip_placeholders and (why := check_image(src / rel, True)) and why.startswith("placeholder"):
            return "skipped", rel, None, why
        try:
            with Image.open(src / rel) as im:
                im = im.convert("RGB")  # first frame of an animation; grey/palette/alpha -> RGB
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return "skipped", rel, None, f"unreadable ({type(e).__name__})"
        # EXIF orientation is deliberately not applied: headstart reads the source without it too.
        im = corrupt_image(im, blur=blur, dark=dark, noise=noise, jpeg=jpeg, rng=_file_rng(seed, rel.as_posix()))
        fmt, options = SAVE_AS.get(target.suffix.lower(), ("PNG", {}))
        im.save(tmp / target, format=fmt, **options)
        return "image", rel, target, None

    images, copied, skipped, renamed = 0, 0, [], {}
    # Threads, not processes: PIL releases the GIL while decoding, filtering and encoding.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for kind, rel, target, reason in tqdm(pool.map(work, plan), total=len(plan), disable=not progress,
                                              file=sys.stderr, desc="corrupt", unit="file"):
            if kind == "copied":
                copied += 1
            elif kind == "skipped":
                skipped.append([rel.as_posix(), reason])
            else:
                images += 1
                if target != rel:
                    renamed[rel.as_posix()] = target.as_posix()
    info = {"source": str(src), "blur": blur, "dark": dark, "noise": noise, "jpeg": jpeg, "seed": int(seed),
            "skip_placeholders": skip_placeholders,
            "images": images, "copied": copied, "skipped": skipped, "renamed": renamed,
            "headstart_version": _version()}
    (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
