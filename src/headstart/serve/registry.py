"""What the server serves: every specialist found in the folders given at start, by id.

Sources: a bundle folder (id = its folder name), a lineage folder (its current version, id = the lineage
folder's name), a hub folder (it has `index.json`: every entry, id = the entry's name). Requests name a
specialist only by id; no path from a request ever reaches the file system.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..core.errors import HeadstartError
from .errors import ServeError, UnknownSpecialist
from .limits import Limits
from .pool import BasePool
from .served import Served

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
HUB_INDEX = "index.json"


def hub_entries(hub: Path) -> list[dict[str, Any]]:
    """The entries of a hub folder, each with `name` and `path` (the bundle folder)."""
    try:
        from ..hub import entries  # helper B's reader, when present
    except ImportError:
        entries = None
    if entries is not None:
        return [{**e, "path": Path(e["path"])} for e in entries(hub)]
    try:
        index = json.loads((hub / HUB_INDEX).read_text())
    except (OSError, ValueError) as e:
        raise ServeError(f"{hub}: unreadable {HUB_INDEX} ({' '.join(str(e).split())[:120]})") from None
    rows = index.get("entries", index.get("bundles", [])) if isinstance(index, dict) else index
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise ServeError(f"{hub}: {HUB_INDEX} holds no list of entries with a name")
    return [{**r, "path": hub / str(r.get("path", r["name"]))} for r in rows]


def heads_to_serve(folder: Path) -> list[str | None]:
    """[None] for a bundle with a default (or only) head; every head's name for a bundle with a head per
    task and no default one (each is served as `<id>.<head>`)."""
    from ..bundle.format import read_manifest
    from ..bundle.manifest import DEFAULT

    heads = read_manifest(folder).get("heads") or {}
    return sorted(heads) if len(heads) > 1 and DEFAULT not in heads else [None]


def find_specialists(sources: list[str | Path]) -> list[tuple[str, Path, str]]:
    """(id, bundle folder, the source it came from) for every bundle the sources hold."""
    from ..bundle.lineage import is_lineage, resolve_bundle

    found = []
    for source in map(Path, sources):
        if not source.is_dir():
            raise ServeError(f"{source}: no such folder (give bundle, lineage or hub folders)")
        if (source / HUB_INDEX).is_file():
            root = source.resolve()
            for entry in hub_entries(source):
                path = Path(entry["path"])
                if not path.resolve().is_relative_to(root):
                    raise ServeError(f"{source}: entry {entry['name']!r} points outside the hub ({path})")
                found.append((str(entry["name"]), path, str(source)))
        elif is_lineage(source) or (source / "manifest.json").is_file():
            found.append((source.resolve().name, resolve_bundle(source), str(source)))
        else:
            raise ServeError(f"{source}: not a bundle (no manifest.json), a lineage or a hub (no {HUB_INDEX})")
    return found


def plan_specialists(sources: list[str | Path]) -> dict[str, tuple[Path, str | None, str]]:
    """{id: (bundle folder, head, source)} for every specialist the sources hold, without loading any: a foreign
    folder, a bad id or two sources giving one id stop the start (the in-process registry and Ray replicas
    both start from this plan)."""
    plan: dict[str, tuple[Path, str | None, str]] = {}
    origin: dict[str, str] = {}
    for bundle_id, folder, source in find_specialists(sources):
        try:
            heads = heads_to_serve(folder)
        except HeadstartError as e:
            raise ServeError(f"cannot serve {bundle_id!r} ({source}): {' '.join(str(e).split())}") from None
        for head in heads:
            spec_id = f"{bundle_id}.{head}" if head else bundle_id
            if not ID_PATTERN.match(spec_id):
                raise ServeError(f"{source}: {spec_id!r} cannot be an id (letters, digits, '.', '_', '-'; "
                                 "up to 100; rename the folder or hub entry)")
            if spec_id in origin:
                raise ServeError(f"two sources give the id {spec_id!r}: {origin[spec_id]} and {source} "
                                 "(rename one folder or hub entry)")
            origin[spec_id] = source
            plan[spec_id] = (folder, head, source)
    if not plan:
        raise ServeError("no specialists to serve: the sources hold no bundles")
    return plan


async def specialist(registry: Any, specialist_id: str) -> Any:
    """`registry.get(specialist_id)`, off the event loop where getting may load: a Ray replica's registry loads
    a specialist it does not hold (`aget`, in a worker thread); the in-process one holds them all."""
    aget = getattr(registry, "aget", None)
    return await aget(specialist_id) if aget is not None else registry.get(specialist_id)


class Registry:
    """The served specialists by id, all loaded at start (a broken bundle stops the start, not a request).

    >>> registry = Registry(["runs/trec-ft", "hub/"])
    >>> registry.ids()
    ['ants', 'trec-ft']
    """

    def __init__(self, sources: list[str | Path], *, limits: Limits | None = None, pool: BasePool | None = None,
                 max_batch: int = 32, max_wait_s: float = 0.005):
        self.limits = limits or Limits()
        self.pool = pool or BasePool()
        self.sources = [str(s) for s in sources]
        self._served: dict[str, Served] = {}
        for spec_id, (folder, head, source) in plan_specialists(sources).items():
            try:
                self._served[spec_id] = Served.load(spec_id, folder, self.pool, self.limits, max_batch, max_wait_s,
                                                    head)
            except HeadstartError as e:
                raise ServeError(f"cannot serve {spec_id!r} ({source}): {' '.join(str(e).split())}") from None

    def ids(self) -> list[str]:
        return sorted(self._served)

    def get(self, specialist_id: str) -> Served:
        """The specialist served under `specialist_id`; UnknownSpecialist (a 404) otherwise."""
        served = self._served.get(specialist_id)
        if served is None:
            raise UnknownSpecialist(specialist_id, self.ids())
        return served

    def __iter__(self):
        return iter(self._served[i] for i in self.ids())

    def __len__(self) -> int:
        return len(self._served)
