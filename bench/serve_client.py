"""The server process and the async load driver bench/serve.py uses (loopback only, bounded loops).

    with ServerProcess([bundle], work, name="one") as server:      # `headstart serve` in a subprocess, auth on
        stats = asyncio.run(drive(server, jobs, concurrency=8))     # throughput, p50/p99, statuses
        server.rss_mb()                                             # VmRSS of the server process
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 600  # smollm2 + 20 minilm specialists load in well under this on 2 cores
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`headstart.serve.serve(sources, ...)` on a free 127.0.0.1 port in its own process (so its RSS is its own),
    with the bearer token in `work/token` (written by the server, mode 0600). Stopped on exit, killed if stuck."""

    def __init__(self, sources: list[Path], work: Path, *, name: str, threads: int | None = None, **options: Any):
        self.sources, self.work, self.name, self.threads, self.options = sources, work, name, threads, options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = work / "token"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        sources = [str(s) for s in self.sources]
        code = (f"from headstart.serve import serve; serve({sources!r}, port={self.port}, "
                f"token_file={str(self.token_file)!r}, log_level='warning', **{self.options!r})")
        env = dict(os.environ)
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        log = (self.work / "logs").joinpath(f"{self.name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: a chatty server must never block on a full pipe nobody reads.
        self.log_file = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.name} exited at start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            self.__exit__()
            raise SystemExit(f"server {self.name} did not answer /health within {START_TIMEOUT_S} s")
        self.token = self.token_file.read_text().strip()
        return self

    def __exit__(self, *_: Any) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log_file.close()

    def rss_mb(self) -> float:
        """Resident memory of the server process (VmRSS from /proc), MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def pss_mb(self) -> float:
        """Proportional set size of the server process (Pss from /proc smaps_rollup), MB: pages shared with other
        processes (torch's libraries, say) count a share each, so a sum over processes counts them once."""
        for line in Path(f"/proc/{self.proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def client(self, concurrency: int = 1, auth: bool = True) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(latencies: list[float], wall: float, statuses: Counter, errors: int) -> dict[str, Any]:
    return {"requests": len(latencies), "wall_s": round(wall, 3), "req_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * percentile(latencies, 50), 2), "p99_ms": round(1000 * percentile(latencies, 99), 2),
            "errors": errors, "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}}


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: the load driver's client.

    httpx spends about 2 ms of CPU per request; on a 2-core box that is taken from the server being
    measured (micro-batching measured 1.55x through httpx, 4.1x through wrk, a C client). This sends and
    reads the bytes and nothing else: Content-Length or chunked bodies, reconnecting when the server closes.
    """

    def __init__(self, port: int, headers: dict[str, str]):
        self.port, self.headers = port, headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = {"Host": f"127.0.0.1:{self.port}", "Content-Length": str(len(body)), **self.headers, **(headers or {})}
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
        try:
            self.writer.write("\r\n".join(lines).encode("latin-1") + body)
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            fields: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                fields[name.strip().lower()] = value.strip()
            if fields.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while size := int((await self.reader.readline()).strip(), 16):
                    data += await self.reader.readexactly(size)
                    await self.reader.readline()
                await self.reader.readline()
            else:
                data = await self.reader.readexactly(int(fields.get("content-length", 0)))
        except BaseException:
            self.close()
            raise
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def drive(server: ServerProcess, jobs: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Send every job (`{"path", "json" | "content", "headers"?, "method"?}`) with `concurrency` requests in
    flight, over `concurrency` keep-alive connections; an error is anything but a 200 whose body is a JSON
    list (a transport failure included)."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    errors = 0
    queue = iter(jobs)
    auth = {"Authorization": f"Bearer {server.token}"}

    async def worker() -> None:
        nonlocal errors
        connection = Connection(server.port, auth)
        try:
            for job in queue:  # one iterator shared by the workers: each job is sent once
                if "json" in job:
                    body, headers = json.dumps(job["json"]).encode(), {"Content-Type": "application/json"}
                else:
                    body, headers = job.get("content") or b"", {}
                t0 = time.perf_counter()
                try:
                    status, data = await connection.request(job.get("method", "POST"), job["path"], body,
                                                            {**headers, **job.get("headers", {})})
                    ok = status == 200 and data[:1] == b"[" and isinstance(json.loads(data), list)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                    status, ok = type(e).__name__, False
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
                errors += not ok
        finally:
            connection.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(latencies, time.perf_counter() - t0, statuses, errors)


async def stream_chat(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streamed chat (SSE): completion tokens (the server's usage count), time to first piece, wall time."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.8, "seed": seed}
    t0 = time.perf_counter()
    first, tokens, pieces = None, 0, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"chat stream answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                pieces += 1
                first = first if first is not None else time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"tokens": tokens, "pieces": pieces, "ttft_s": first, "wall_s": time.perf_counter() - t0}


PROTOCOL_PATHS = ("/v1/embeddings", "/v1/chat/completions", "/v1/completions")
DEFAULT_MAX_BODY = 16 * 1024 * 1024


def fuzz_jobs(n: int, text_id: str, image_id: str, llm_id: str | None, seed: int = 0,
              max_body_bytes: int = DEFAULT_MAX_BODY) -> list[dict[str, Any]]:
    """`n` malformed or refused requests over every route family; each must get a 4xx, never a 5xx.

    Besides the `n` drawn ones, one chunked body (no Content-Length) just over `max_body_bytes` goes to
    each protocol's route: the BodyLimit refuses it while it streams in (413)."""
    rng = random.Random(seed)
    ids = [text_id, image_id, "no-such-model", "..%2F..%2Fetc%2Fpasswd", "%00", "x" * 300, "é"]

    def noise(k: int = 64) -> bytes:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, k)))

    bad_json = [b"{", b'{"inputs": }', b"[1, 2", b"\xff\xfe", b"null", b"123", b'"just a string"', b"{}"]
    bad_values: list[Any] = [123, None, {"a": 1}, [1, 2], [], "", [[["deep"]]], True, ["ok", 5], "z" * 25_000,
                             ["q"] * 65]
    makers = [
        lambda: {"path": f"/models/{rng.choice(ids)}/predict", "content": noise(),
                 "headers": {"Content-Type": rng.choice(["application/json", "image/png", "application/octet-stream",
                                                          "text/plain", "application/pdf", "multipart/form-data"])}},
        lambda: {"path": f"/models/{rng.choice(ids[:2])}/predict", "content": rng.choice(bad_json)},
        lambda: {"path": f"/models/{text_id}/predict", "json": {"inputs": rng.choice(bad_values)}},
        lambda: {"path": f"/models/{text_id}/predict",
                 "json": {"inputs": "Who?", "parameters": {"top_k": rng.choice(["x", -1, 0, 1.5, None, [2]])}}},
        lambda: {"path": f"/models/{image_id}/predict", "json": {"inputs": rng.choice(["bm90IGFuIGltYWdl", "data:x", 7])}},
        lambda: {"path": f"/models/{text_id}/predict", "json": {"inputs": "Who?"},
                 "headers": {"Authorization": rng.choice(["Bearer wrong", "", "Basic abc", "Bearer"])}},
        lambda: {"method": rng.choice(["GET", "PUT", "DELETE"]), "path": f"/models/{text_id}/predict"},
        lambda: {"path": "/v1/chat/completions",
                 "json": rng.choice([{"model": text_id, "messages": [{"role": "user", "content": "hi"}]},
                                     {"model": llm_id or text_id, "messages": "hi"},
                                     {"model": llm_id or text_id, "messages": [], "max_tokens": -3},
                                     {"model": llm_id or text_id, "messages": [{"role": "user", "content": "hi"}],
                                      "temperature": 9}, {"messages": [{"role": "user"}]}])},
        lambda: {"path": "/v1/embeddings", "json": {"model": rng.choice(ids), "input": rng.choice(bad_values[:8])}},
        lambda: {"path": f"/v2/models/{rng.choice(ids)}/infer",
                 "json": rng.choice([{}, {"inputs": "x"}, {"inputs": [{"name": "text", "datatype": "BYTES"}]},
                                     {"inputs": [{"name": "t", "shape": [2], "datatype": "FP32", "data": ["a"]}]}])},
        lambda: {"path": f"/models/{text_id}/predict", "content": b"--b\r\nbroken",
                 "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
        # Raw bytes, invalid UTF-8 inside JSON and JSON nested past the parser's recursion limit, on the
        # OpenAI and v2 routes too (FastAPI wraps these parse failures; each must stay a 4xx).
        lambda: {"path": rng.choice(protocol_paths), "content": rng.choice(hard_bodies)(),
                 "headers": {"Content-Type": "application/json"}},
    ]
    protocol_paths = [*PROTOCOL_PATHS, f"/v2/models/{text_id}/infer", f"/models/{text_id}/predict"]
    hard_bodies = [noise, lambda: b'{"model": "\xff", "input": "\xfe"}', lambda: b"[" * 5000 + b"]" * 5000,
                   lambda: b'{"a":' * 5000 + b"1" + b"}" * 5000]
    oversize = [{"path": path, "chunked": max_body_bytes + 1, "headers": {"Content-Type": "application/json"}}
                for path in protocol_paths]
    return [rng.choice(makers)() for _ in range(n)] + oversize


async def _chunks(total: int, size: int = 1 << 20):
    """`total` bytes in pieces, sent with Transfer-Encoding: chunked (no Content-Length to refuse up front)."""
    while total > 0:
        yield b" " * min(size, total)
        total -= size


async def fuzz(server: ServerProcess, jobs: list[dict[str, Any]], concurrency: int = 8) -> dict[str, Any]:
    """Send the fuzzed jobs; count 5xx answers and dropped connections (both failures), and the 4xx codes."""
    statuses: Counter = Counter()
    queue = iter(jobs)
    async with server.client(concurrency) as client:
        async def worker() -> None:
            for job in queue:
                try:
                    content = _chunks(job["chunked"]) if "chunked" in job else job.get("content")
                    r = await client.request(job.get("method", "POST"), job["path"], json=job.get("json"),
                                             content=content, headers=job.get("headers"))
                    statuses[r.status_code] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    fatal = sum(v for k, v in statuses.items() if not isinstance(k, int) or k >= 500)
    return {"requests": len(jobs), "server_errors": fatal, "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}}
