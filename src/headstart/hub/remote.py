"""The Hugging Face Hub: push a hub specialist to a model repository, pull one back (`hf:owner/repo`).

The bundle goes up as it is (its README.md is already an HF model card, bundle/card.py) plus
`headstart-files.json`, the sha256 of every file as the local index recorded it; a pull copies only
the files listed there and checks each hash, so a repository changed by other hands (or a file torn
in transit) is refused. Without a network either way fails with one line naming the cause.

    >>> push("trec-ft", "hub/", "me/trec-ft")           # token: HF_TOKEN or `hf auth login`
    'https://huggingface.co/me/trec-ft'
    >>> pull_remote("hf:me/trec-ft", "runs/trec-ft")
    PosixPath('runs/trec-ft')
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from ..bundle.format import one_line, read_manifest
from ..core.storage import atomic_dir
from .index import HubError, find_entry, hub_folder
from .local import _out_folder, copy_verified

FILES = "headstart-files.json"
FILES_FORMAT = "headstart-hub-files"
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
NETWORK_HINT = "the Hugging Face Hub needs a network connection and, to push, a token (HF_TOKEN or `hf auth login`)"


def push(name: str, hub: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload a hub specialist to a Hugging Face Hub model repository; return the repository's address.

    name: the specialist's name in the hub.
    hub: the hub folder.
    repo_id: the model repository, `owner/name` (created when missing).
    token: a Hugging Face token with write access (default: HF_TOKEN, or the one `hf auth login` saved).
    private: create the repository as private.

    Only files whose sha256 still matches the index are uploaded (a file altered in the hub refuses the push).
    """
    check_repo_id(repo_id)
    entry = find_entry(hub, name)
    hf = _huggingface_hub()
    with tempfile.TemporaryDirectory(prefix="headstart-push-") as tmp:
        staging = Path(tmp)
        copy_verified(hub_folder(hub) / name, entry["files"], staging, f"{name} in {hub}")
        listing = {"format": FILES_FORMAT, "format_version": 1, "name": name, "files": entry["files"]}
        (staging / FILES).write_text(json.dumps(listing, indent=1), encoding="utf-8")
        try:
            hf.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
            hf.upload_folder(folder_path=str(staging), repo_id=repo_id, repo_type="model", token=token,
                             commit_message=f"headstart hub push {name}")
        except Exception as e:  # noqa: BLE001  any failure of the remote service is one line to act on
            raise remote_error("push to", repo_id, e) from None
    return f"https://huggingface.co/{repo_id}"


def pull_remote(source: str, out: str | Path, token: str | None = None, replace: bool = False) -> Path:
    """Download a specialist pushed with `push` (`hf:owner/repo`) into `out`, checking every file's sha256.

    source: `hf:owner/repo`.
    out: the bundle folder to write.
    token: a Hugging Face token, for a private repository (default: HF_TOKEN or the saved login).
    replace: overwrite `out` when it exists.
    """
    repo_id = check_repo_id(source.removeprefix("hf:"))
    target = _out_folder(out, replace)
    hf = _huggingface_hub()
    with tempfile.TemporaryDirectory(prefix="headstart-pull-") as tmp:
        try:
            local = Path(hf.snapshot_download(repo_id=repo_id, repo_type="model", local_dir=tmp, token=token))
        except Exception as e:  # noqa: BLE001  as in push
            raise remote_error("pull from", repo_id, e) from None
        files = _listing(local, repo_id)
        with atomic_dir(target) as out_tmp:
            copy_verified(local, files, out_tmp, f"hf:{repo_id}")
            read_manifest(out_tmp)
    return target


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(f"{str(repo_id)[:80]!r} is not a Hugging Face repository id (owner/name)")
    return repo_id


def remote_error(verb: str, repo_id: str, e: BaseException) -> HubError:
    """One line for a failed call to the Hugging Face Hub: what failed, the cause, what it needs."""
    return HubError(f"could not {verb} hf:{repo_id}: {type(e).__name__}: {one_line(e)[:160]} ({NETWORK_HINT})")


def _listing(local: Path, repo_id: str) -> dict[str, Any]:
    path = local / FILES
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise HubError(f"hf:{repo_id} has no readable {FILES}: it was not pushed by `headstart hub push`, so its "
                       "files cannot be verified; pull refused") from None
    files = listing.get("files") if isinstance(listing, dict) else None
    if not isinstance(listing, dict) or listing.get("format") != FILES_FORMAT or not isinstance(files, dict) or not files \
            or not all(isinstance(v, dict) for v in files.values()):
        raise HubError(f"hf:{repo_id}: {FILES} is not a headstart file list; pull refused")
    return files


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("pushing to and pulling from the Hugging Face Hub needs huggingface_hub "
                       "(pip install huggingface_hub)") from None
    return huggingface_hub
