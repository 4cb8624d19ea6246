"""Bases that are not registered: a local folder or file, a timm model name, a hub id.

Order: a path that exists wins; then a timm model name; then `owner/name` as a Hugging Face
hub id, looked up in the local hub cache first. Network use never hangs: the local cache is
tried with `local_files_only`, nothing online is tried under HF_HUB_OFFLINE, and the online
attempt is one metadata call (timm's own downloader retries for ~45 s when offline, so it is
never used here).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.storage import sha256_file
from ..core.errors import UnknownBaseError
from .backbone import Backbone

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# What a model needs from a hub repo; skips ONNX/TF/flax copies and other formats.
# README.md is the model card: its front matter declares the licence.
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors", "README.md"]


def resolve_unregistered(name_or_path: str, pretrained: bool = True) -> Backbone | None:
    """Build a backbone for something not in the registry, or None when nothing matches.

    >>> resolve_unregistered("resnet18", pretrained=False).info.kind
    'image'
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        backbone = _from_local(path, name=name_or_path, source=str(path.resolve()), pretrained=pretrained)
        return _with_license(backbone, path if path.is_dir() else path.parent)
    if _is_timm_name(name_or_path):
        return _from_timm_name(name_or_path, pretrained)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        folder = hub_snapshot(name_or_path)
        backbone = _from_local(folder, name=name_or_path, source=f"hf-hub:{name_or_path}", pretrained=pretrained)
        if backbone is None:
            raise UnknownBaseError(f"hub repo {name_or_path!r} holds neither a transformers, timm nor GGUF model")
        return _with_license(backbone, folder)
    return None


def declared_license(folder: Path) -> str:
    """The licence a model folder declares: `license:` in its model card's front matter (Hugging Face),
    else in the `pretrained_cfg` of its config.json (timm); '' when it declares none.

    >>> declared_license(Path("no/such/folder"))
    ''
    """
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            front_matter = text.split("---", 2)[1]
            for line in front_matter.splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "license" and value.strip():
                    return value.strip().strip("'\"")
    pretrained_cfg = _read_config(folder).get("pretrained_cfg") or {}
    return str(pretrained_cfg.get("license") or "")


def _with_license(backbone: Backbone | None, folder: Path) -> Backbone | None:
    if backbone is not None and not backbone.info.license:
        backbone.info.license = declared_license(folder)
    return backbone


def _from_local(path: Path, *, name: str, source: str, pretrained: bool) -> Backbone | None:
    from .causal_lm import load_causal_lm_folder, load_gguf
    from .clip import is_clip_config, load_clip_folder
    from .text import load_text_folder

    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, name=name, source=source, pretrained=pretrained)
        config = _read_config(path.parent)
        if path.suffix in WEIGHT_SUFFIXES and "architecture" in config:
            return load_timm_folder(path.parent, name=name, source=source, weights=path, pretrained=pretrained)
        return None
    config = _read_config(path)
    if "architecture" in config:  # timm writes `architecture`, transformers `architectures`
        return load_timm_folder(path, name=name, source=source, pretrained=pretrained)
    if is_clip_config(config):  # CLIP / SigLIP: an image base with a text tower
        return load_clip_folder(path, name=name, source=source, pretrained=pretrained)
    if "architectures" in config or "model_type" in config:
        if any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
            return load_causal_lm_folder(path, name=name, source=source, pretrained=pretrained)
        return load_text_folder(path, name=name, source=source, pretrained=pretrained)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return load_gguf(ggufs[0], name=name, source=str(ggufs[0]), pretrained=pretrained)
    return None


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def load_timm_folder(
    folder: Path, *, name: str, source: str, weights: Path | None = None, pretrained: bool = True
) -> Backbone:
    """A timm hub-style folder (config.json with `architecture` + weights) as an image base."""
    import timm
    from safetensors.torch import load_file

    from .image import TimmImageBackbone

    config = _read_config(folder)
    kwargs = dict(config.get("model_args") or {})
    if "num_classes" in config:
        kwargs["num_classes"] = config["num_classes"]
    model = timm.create_model(
        config["architecture"], pretrained=False, pretrained_cfg_overlay=config.get("pretrained_cfg") or None, **kwargs
    )
    if weights is None:
        found = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).exists()]
        weights = found[0] if found else None
    if weights is None:
        raise UnknownBaseError(f"{folder} has a timm config.json but no model.safetensors / pytorch_model.bin")
    if pretrained:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return TimmImageBackbone(
        model, name=name, source=source if pretrained else "random init", sha256=sha256_file(weights)
    )


def _is_timm_name(name: str) -> bool:
    import timm

    try:
        return bool(timm.is_model(name))
    except Exception:  # odd strings (paths, hub ids) can trip timm's name parsing
        return False


def _from_timm_name(name: str, pretrained: bool) -> Backbone:
    import timm

    from .image import TimmImageBackbone

    if not pretrained:
        model = timm.create_model(name, pretrained=False)
        return TimmImageBackbone(model, name=name, source="random init", sha256="random")
    pretrained_cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if not hub_id:
        raise UnknownBaseError(f"timm model {name!r} has no Hugging Face hub weights; use pretrained=False")
    try:
        folder = hub_snapshot(hub_id)
    except UnknownBaseError as e:
        raise UnknownBaseError(f"timm model {name!r}: pretrained weights need the Hugging Face hub. {e}") from None
    backbone = _with_license(load_timm_folder(folder, name=name, source=f"hf-hub:{hub_id}"), folder)
    if not backbone.info.license:  # timm's registry knows the licence of the weights it points to
        backbone.info.license = str(getattr(pretrained_cfg, "license", None) or "")
    return backbone


def hub_snapshot(repo_id: str) -> Path:
    """Local folder of a hub repo: from the hub cache, else downloaded (unless HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception as cached_error:  # not cached (or a malformed id)
        if constants.HF_HUB_OFFLINE:
            raise UnknownBaseError(
                f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            ) from cached_error
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=10))
        if not any(folder.glob("*.safetensors")):  # repos that only ship pickled .bin weights
            folder = Path(snapshot_download(repo_id, allow_patterns=[*HUB_PATTERNS, "*.bin"], etag_timeout=10))
        return folder
    except Exception as e:
        raise UnknownBaseError(
            f"{repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
