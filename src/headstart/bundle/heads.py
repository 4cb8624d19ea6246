"""Several heads over one base in one bundle: copy another bundle's head in under a name.

    add_head("runs/news", "sentiment", "runs/sentiment-probe")   # both probes on minilm-l6
    headstart.load("runs/news", head="sentiment").predict(["What a match!"])

Only heads of frozen-base methods (probe, prototype) compose this way: their head is all they
trained, so any number of them run on one copy of the base.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..core.errors import BundleError
from ..core.storage import atomic_dir
from .format import FORMAT_VERSION, MANIFEST, read_manifest, read_trained
from .manifest import HEADS_DIR, validate

COMPOSABLE = ("probe", "prototype")
"""Methods whose bundle holds a head and nothing of the base."""


def add_head(bundle: str | Path, name: str, source: str | Path) -> Path:
    """Add the default head of bundle `source` to bundle `bundle` as head `name`, atomically.

    Both must be classifier bundles of the same composable method (probe, prototype) on the same
    base weights. Returns `bundle`.
    """
    bundle, source = Path(bundle), Path(source)
    target, donor = read_manifest(bundle), read_manifest(source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or name in target.get("heads", {}):
        raise BundleError(f"{bundle}: head name {name!r} is taken or not a plain name (letters, digits, _ . -)")
    for folder, m in ((bundle, target), (source, donor)):
        if m["kind"] != "classifier" or m["method"]["name"] not in COMPOSABLE:
            raise BundleError(f"{folder}: only {' / '.join(COMPOSABLE)} classifier heads compose on one base "
                              f"(this is a {m['method']['name']} {m['kind']})")
    if target["method"]["name"] != donor["method"]["name"]:
        raise BundleError(f"{source}: a {donor['method']['name']} head cannot join a {target['method']['name']} bundle")
    if target["base"]["sha256"] != donor["base"]["sha256"]:
        raise BundleError(f"{source}: trained on other base weights than {bundle} "
                          f"({donor['base']['sha256'][:12]}... vs {target['base']['sha256'][:12]}...)")
    head = read_trained(source)
    weights = f"{HEADS_DIR}/{name}.safetensors"
    target.setdefault("heads", {})[name] = {"classes": list(donor["heads"]["default"]["classes"]),
                                            "weights": weights, "from": str(source)}
    target["format_version"] = FORMAT_VERSION  # it now holds version-2 fields (a v1 bundle is upgraded)
    validate(target, str(bundle / MANIFEST))
    from safetensors.torch import save_file

    with atomic_dir(bundle) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        (tmp / HEADS_DIR).mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in head.items()}, tmp / weights, metadata={"source": str(source)})
        (tmp / MANIFEST).write_text(json.dumps(target, indent=2))
    return bundle
