"""Outgrowing one machine: the same app as a Ray Serve deployment, specialists loaded on demand per replica.

    headstart serve runs/ hub/ --ray --replicas 2      # a local Ray; its HTTP proxy on 127.0.0.1:8080
    serve run serve_ray.yaml                           # or Ray's own CLI over `ray_app:build` (docs/SERVE.md)

Every replica runs the app `make_app` builds, over a `ReplicaRegistry`: every id the sources hold is known
at start (only manifests are read), and a specialist is loaded the first time a request names it, through
Ray Serve's `@serve.multiplexed` (keyed by the `serve_multiplexed_model_id` header, else by the id in the
path), onto the replica's one `BasePool`: one base per replica, shared by the specialists loaded on it, as in
the in-process server. Ray's proxy sends a request carrying the header to a replica already holding that
specialist. Ray moves ids and request bodies only: each replica reads the bundles from their folders and the
token from its file, so every replica needs the same paths (one machine, or a shared disk).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ray import serve

from ..core.errors import HeadstartError
from .app import make_app
from .auth import resolve_token
from .errors import ApiError, ServeError, UnknownSpecialist
from .limits import Limits, _reply
from .pool import DEFAULT_MAX_ADAPTERS, BasePool
from .registry import plan_specialists
from .served import Served
from .token_scheduler import scheduler_for

LOG = logging.getLogger(__name__)
MODEL_ID_HEADER = "serve_multiplexed_model_id"
"""Ray Serve's header naming the model of a request: its proxy routes by it, `@serve.multiplexed` loads by it."""
MAX_MODELS_PER_REPLICA = 16
"""Specialists one replica keeps loaded (least recently used ones are dropped; their base stays)."""
NAMED_IN_PATH = re.compile(r"^/(?:v2/)?models/([^/]+)")
"""Routes naming a specialist in the path: /models/{id}[/predict], /v2/models/{id}[/infer|/ready]; /v1/ POSTs
name it in the JSON body's "model"."""


class ReplicaRegistry:
    """The registry the routers see in a replica: every id known, a specialist loaded when first named.

    `hold`/`forget` mirror what `@serve.multiplexed` keeps loaded; `get` of an id it does not hold (a listing
    route; one just dropped by a concurrent request's load) loads that specialist for the one request (cheap once
    its base is in the pool: a manifest, a head, an adapter the pool already knows).
    """

    def __init__(self, sources: list[str | Path], *, limits: Limits, pool: BasePool, max_batch: int = 32,
                 max_wait_s: float = 0.005):
        self.limits, self.pool, self.max_batch, self.max_wait_s = limits, pool, max_batch, max_wait_s
        self.sources = [str(s) for s in sources]
        self._plan = plan_specialists(sources)
        self._held: dict[str, Served] = {}
        self._load_lock = threading.Lock()  # the pool is not thread-safe; loads run in worker threads
        self.loads: Counter = Counter()
        """Loads per id so far (multiplexed and one-request loads alike)."""

    def ids(self) -> list[str]:
        return sorted(self._plan)

    def knows(self, specialist_id: str) -> bool:
        return specialist_id in self._plan

    def load(self, specialist_id: str) -> Served:
        """Load one specialist onto the replica's shared bases (blocking: call it in a worker thread)."""
        folder, head, _ = self._plan[specialist_id]
        with self._load_lock:
            try:
                served = Served.load(specialist_id, folder, self.pool, self.limits, self.max_batch,
                                     self.max_wait_s, head)
            except HeadstartError as e:
                raise ServeError(f"cannot serve {specialist_id!r}: {' '.join(str(e).split())}") from None
            self.loads[specialist_id] += 1
            return served

    def hold(self, served: Served) -> None:
        self._held[served.id] = served

    def forget(self, served: Served) -> None:
        if self._held.get(served.id) is served:
            del self._held[served.id]
            base = served._generator_base
            if base is not None and base.key[0] != "own":  # its adapter leaves the shared causal LM
                generator = served.generator

                def drop_after_its_answers() -> None:
                    # Answers take turns a token at a time: dropping the adapter between two of their
                    # tokens would fail them, so the answers under way end first.
                    scheduler_for(base).wait_answered(generator.adapter_name)
                    base.drop_generator(generator.model)

                # In a thread: Ray calls this on the event loop, and answers may still be under way.
                threading.Thread(target=drop_after_its_answers, daemon=True).start()

    def describe(self, specialist_id: str) -> Served:
        """What a listing needs (id, manifest, facts): the held specialist, else one described from its
        manifest, nothing loaded (a listing on a replica must not load every specialist it does not hold)."""
        if specialist_id not in self._plan:
            raise UnknownSpecialist(specialist_id, self.ids())
        folder, head, _ = self._plan[specialist_id]
        return self._held.get(specialist_id) or Served.describe(specialist_id, folder, self.limits, head)

    def get(self, specialist_id: str) -> Served:
        """The specialist served under `specialist_id`; UnknownSpecialist (a 404) otherwise."""
        if specialist_id not in self._plan:
            raise UnknownSpecialist(specialist_id, self.ids())
        return self._held.get(specialist_id) or self.load(specialist_id)

    async def aget(self, specialist_id: str) -> Served:
        """`get`, loading an id it does not hold (one just dropped by a concurrent load) in a worker thread."""
        held = self._held.get(specialist_id)
        return held if held is not None else await asyncio.to_thread(self.get, specialist_id)

    def __len__(self) -> int:
        return len(self._plan)


class _Held:
    """What `@serve.multiplexed` keeps per id; Ray calls `__del__` when it drops the id (LRU), so the
    registry stops handing the specialist out (its base and adapters stay with the pool)."""

    def __init__(self, served: Served, registry: ReplicaRegistry):
        self.served, self.registry = served, registry
        registry.hold(served)

    def __del__(self) -> None:
        self.registry.forget(self.served)  # idempotent: Ray calls it, then Python may once more


class LoadNamedSpecialist:
    """ASGI middleware, innermost (after auth and the body limit): the specialist a request names is loaded
    through the multiplexed loader before the route runs, so the route's `registry.get` finds it held."""

    def __init__(self, app: Any, registry: ReplicaRegistry, load: Callable[[str], Any]):
        self.app, self.registry, self.load = app, registry, load

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        specialist_id = named_specialist(scope)
        if not specialist_id and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            try:  # OpenAI-style bodies name the model inside: read it (the body limit still counts)
                specialist_id, receive = await model_in_body(receive)
            except ApiError as e:
                return await _reply(send, e.status, e.code, e.message)
        if specialist_id and self.registry.knows(specialist_id):
            try:
                await self.load(specialist_id)
            except ServeError as e:  # a bundle broken since start: this id fails, the others still serve
                return await _reply(send, 503, "unavailable", str(e))
            except Exception:  # as the app's own handler does: the traceback in the log, none in the answer
                LOG.exception("loading %r failed", specialist_id)
                return await _reply(send, 500, "internal", "the server failed to answer this request; its log says why")
        await self.app(scope, receive, send)


async def model_in_body(receive: Callable[[], Any]) -> tuple[str, Callable[[], Any]]:
    """(the JSON body's "model", or "", and a `receive` that hands the route the same body again)."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client left: the route sees it leave
            async def gone() -> dict[str, Any]:
                return message
            return "", gone
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep: the route answers
        model = None
    return (model if isinstance(model, str) else ""), replay


def named_specialist(scope: dict[str, Any]) -> str:
    """The id a request names: Ray's multiplexed model id (its header), else the id in the path, else ""."""
    try:
        specialist_id = serve.get_multiplexed_model_id()
    except Exception:  # outside a Ray replica (the middleware tested alone): read the header itself
        specialist_id = ""
    if not specialist_id:
        specialist_id = dict(scope.get("headers") or []).get(MODEL_ID_HEADER.encode(), b"").decode("latin-1")
    if not specialist_id:
        match = NAMED_IN_PATH.match(scope.get("path", ""))
        specialist_id = match.group(1) if match else ""
    return specialist_id


_replica_app: Any = None
"""The app of this replica. `@serve.ingress` calls its builder without arguments, after the deployment's
`__init__` built the app and put it here; a replica is an actor process of its own: one app per process."""


def _this_replicas_app() -> Any:
    # Ray ships the deployment class by value (its own globals): both sides name the imported module.
    from headstart.serve import ray_app

    return ray_app._replica_app


@serve.deployment(name="headstart")
@serve.ingress(_this_replicas_app)
class Specialists:
    """One replica: the FastAPI app of `make_app` over a `ReplicaRegistry`, loading specialists by id."""

    def __init__(self, sources: list[str], host: str = "127.0.0.1", token_file: str | None = None,
                 no_auth: bool = False, max_models_per_replica: int = MAX_MODELS_PER_REPLICA,
                 max_adapters: int | None = DEFAULT_MAX_ADAPTERS, adapter_memory_mb: float | None = None,
                 max_batch: int = 32, max_wait_ms: float = 5.0, limits: dict[str, Any] | None = None):
        limits_ = Limits(**(limits or {}))
        limits_.apply_to_pil()
        self.registry = ReplicaRegistry(sources, limits=limits_, pool=BasePool(max_adapters, adapter_memory_mb),
                                        max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
        self.multiplexed_loads: Counter = Counter()
        registry = self.registry

        async def load_specialist(specialist_id: str) -> _Held:
            self.multiplexed_loads[specialist_id] += 1
            return _Held(await asyncio.to_thread(registry.load, specialist_id), registry)

        # Wrapped here, not as a method: the number of specialists per replica is a deployment argument.
        self._load_specialist = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load_specialist)
        # The token is read from its file here: it never travels through Ray.
        app = make_app(sources, token=resolve_token(host, token_file, no_auth), limits=limits_,
                       registry=self.registry)
        from starlette.middleware import Middleware

        app.user_middleware.append(Middleware(LoadNamedSpecialist, registry=registry, load=self._load_specialist))
        from headstart.serve import ray_app  # see _this_replicas_app

        ray_app._replica_app = app

    def loads(self) -> dict[str, Any]:
        """Multiplexed loads per id and every load per id, in this replica (tests and operators)."""
        return {"multiplexed": dict(self.multiplexed_loads), "all": dict(self.registry.loads)}


def build(args: dict[str, Any]) -> Any:
    """The application `serve run` builds (`import_path: headstart.serve.ray_app:build`); `args` are the
    YAML's: sources (list), replicas, and any of `Specialists`' arguments (token_file, max_models_per_replica,
    max_adapters, adapter_memory_mb, max_batch, max_wait_ms, limits)."""
    args = dict(args)
    # Absolute: replicas may run in another working directory than the one the paths were given in.
    sources = [str(Path(s).expanduser().resolve()) for s in args.pop("sources")]
    plan_specialists(sources)  # a missing folder or a bad id stops here, not in every replica
    replicas = int(args.pop("replicas", 1))
    return Specialists.options(num_replicas=replicas).bind(sources, **args)


def run_on_ray(sources: list[str], *, host: str, port: int, replicas: int = 1, token_file: str | None = None,
               no_auth: bool = False, **options: Any) -> None:
    """What `headstart serve --ray` runs: a local Ray, Serve's proxy on host:port, `replicas` replicas,
    until interrupted."""
    import time

    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build({"sources": sources, "replicas": replicas, "host": host, "token_file": token_file,
                     "no_auth": no_auth, **options})
        serve.run(app, name="headstart", route_prefix="/")
        print(f"serving {len(plan_specialists(sources))} specialist(s) on http://{host}:{port}/ over Ray Serve "
              f"({replicas} replica(s), {'no auth' if no_auth else 'auth on'}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C: stop the deployment and the Ray this call started, no traceback
        pass
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
