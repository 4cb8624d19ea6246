"""Serving specialists on a CPU: throughput, latency, memory, micro-batching, images, LLM streaming, load, ONNX.

    python bench/serve.py                       # everything (20 minilm specialists, 10,000 load requests, ...)
    python bench/serve.py --quick               # 2 specialists, 200 load requests, 50 fuzzed: a smoke run (< 3 min)
    python bench/serve.py --parts text,onnx     # a subset: text batching image llm load onnx

Every server is the real one (`headstart.serve.serve`: uvicorn, auth on, token file in the work folder) in its
own process on a free 127.0.0.1 port, driven from this process over keep-alive connections by a lean asyncio
HTTP/1.1 client (serve_client.Connection; httpx for the SSE chats and the fuzzing). Client and server share
the machine's cores, as they would on one box. Specialists are built once under --work (bench/serve_build.py).
"1 specialist" is trec-01 (LoRA) alone; the `processes` part runs each text specialist in a server of its own,
all at once, and sums their memory (RSS and PSS). Adapter switch cost: concurrency 1, alternating two LoRA
ids vs one id (every request selects another adapter). ONNX vs PyTorch runs in this process, no server.
Issue targets: resident memory of 20 specialists <= 1.3x one; micro-batching >= 3x throughput at concurrency 32
vs max_batch=1; 10,000 mixed requests with 0 errors; 1,000 fuzzed requests with 0 5xx; ONNX at least the
speed-up sentence-transformers reports for MiniLM on CPU (fp32 1.4x, int8 3.1x PyTorch).

Prints one markdown table per part; writes bench/results/serve.json (serve_quick.json with --quick) atomically
after each part, keeping the parts of an earlier run that this one did not redo.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_build as build  # noqa: E402
from serve_client import ServerProcess, drive, fuzz, fuzz_jobs, stream_chat  # noqa: E402

DATA = REPO.parent / "shared" / "data"
PARTS = ("text", "processes", "batching", "image", "llm", "load", "onnx")
MIN_FREE_MB = 3000  # `processes` starts no further server once less memory than this is available
ANCHOR = {"fp32": 1.4, "int8": 3.1}  # sentence-transformers' ONNX speed-ups over PyTorch on CPU (MiniLM class)
SIZES = {  # full run / --quick
    "full": {"specialists": 20, "per_slice": 240, "epochs": 2, "requests": 400, "photos_per_class": 20,
             "image_requests": 120, "max_tokens": 64, "chat_rounds": 2, "load": 10_000, "fuzz": 1000, "onnx_reps": 30},
    "quick": {"specialists": 2, "per_slice": 48, "epochs": 1, "requests": 48, "photos_per_class": 6,
              "image_requests": 16, "max_tokens": 16, "chat_rounds": 1, "load": 200, "fuzz": 50, "onnx_reps": 5},
}


def md(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def text_jobs(ids: list[str], texts: list[str], n: int, rng: random.Random | None = None) -> list[dict]:
    """`n` one-question predict requests cycling over `ids` (random ids and questions with `rng`)."""
    pick = (lambda seq, k: rng.choice(seq)) if rng else (lambda seq, k: seq[k % len(seq)])
    return [{"path": f"/models/{pick(ids, k)}/predict", "json": {"inputs": pick(texts, k)}} for k in range(n)]


def warm(server: ServerProcess, ids: list[str], texts: list[str]) -> None:
    """Every specialist answers a few times (adapters injected, threads started) before anything is measured."""
    asyncio.run(drive(server, text_jobs(ids, texts, 4 * len(ids) + 64), 8))


# ---- parts -----------------------------------------------------------------------------------------------
def part_text(ctx: dict) -> dict:
    bundles, texts, size = ctx["text"], ctx["texts"], ctx["size"]
    loras = [b.name for b in bundles if int(b.name.split("-")[1]) % 2 == 1]
    result: dict = {"servers": {}}
    for label, sources in (("1", bundles[1:2]), (str(len(bundles)), bundles)):
        ids = [b.name for b in sources]
        with ServerProcess(sources, ctx["work"], name=f"text-{label}", threads=ctx["threads"]) as server:
            warm(server, ids, texts)
            row = {"rss_mb": round(server.rss_mb(), 1), "concurrency": {}}
            for c in (1, 8, 32):
                row["concurrency"][c] = asyncio.run(drive(server, text_jobs(ids, texts, size["requests"]), c))
            if label != "1":
                # Alternating two adapters at concurrency 1: every request selects another adapter.
                pair = loras[:2] if len(loras) >= 2 else [loras[0], bundles[0].name]
                n = size["requests"] // 2
                row["switch"] = {"pair": pair,
                                 "one": asyncio.run(drive(server, text_jobs(pair[:1], texts, n), 1)),
                                 "alternating": asyncio.run(drive(server, text_jobs(pair, texts, n), 1))}
            row["rss_mb_after"] = round(server.rss_mb(), 1)
        result["servers"][label] = row
    one, many = result["servers"]["1"], result["servers"][str(len(bundles))]
    result["rss_ratio"] = round(many["rss_mb"] / one["rss_mb"], 3)
    result["rss_20_processes_mb"] = round(len(bundles) * one["rss_mb"], 1)
    s = many["switch"]
    result["switch_cost_ms"] = round(s["alternating"]["p50_ms"] - s["one"]["p50_ms"], 2)
    return result


def table_text(r: dict) -> str:
    rows = []
    for label, row in r["servers"].items():
        for c, cell in row["concurrency"].items():
            rows.append([label, c, cell["req_per_s"], cell["p50_ms"], cell["p99_ms"], cell["errors"], row["rss_mb"]])
    n = max(r["servers"], key=int)
    s = r["servers"][n]["switch"]
    return "\n\n".join([
        md(["specialists", "concurrency", "req/s", "p50 ms", "p99 ms", "errors", "server RSS MB"], rows),
        md(["memory", "MB", "target"], [
            ["1 specialist, one server", r["servers"]["1"]["rss_mb"], ""],
            [f"{n} specialists, one server", r["servers"][n]["rss_mb"],
             f"<= 1.3x one: {r['rss_ratio']}x {verdict(r['rss_ratio'] <= 1.3)}"],
            [f"{n} one-specialist processes ({n} x one's RSS; measured: part processes)", r["rss_20_processes_mb"],
             f"one server is {r['rss_20_processes_mb'] / r['servers'][n]['rss_mb']:.1f}x smaller"]]),
        md(["adapter switch (concurrency 1)", "p50 ms", "p99 ms", "req/s"], [
            [f"one id ({s['pair'][0]})", s["one"]["p50_ms"], s["one"]["p99_ms"], s["one"]["req_per_s"]],
            [f"alternating {' / '.join(s['pair'])}", s["alternating"]["p50_ms"], s["alternating"]["p99_ms"],
             s["alternating"]["req_per_s"]],
            ["switch cost (p50 difference)", r["switch_cost_ms"], "", ""]])])


def part_processes(ctx: dict) -> dict:
    """Each text specialist in a server of its own, all running at once, against the one server of `text`
    that holds them all: the memory summed (RSS, and PSS, which counts the pages the processes share,
    torch's libraries among them, once). Stops starting servers when the machine runs short of memory."""
    from contextlib import ExitStack

    bundles, texts = ctx["text"], ctx["texts"]
    with ExitStack() as stack:
        servers = []
        for bundle in bundles:
            if available_mb() < MIN_FREE_MB:
                break
            server = stack.enter_context(ServerProcess([bundle], ctx["work"], name=f"alone-{bundle.name}",
                                                       threads=ctx["threads"]))
            asyncio.run(drive(server, text_jobs([bundle.name], texts, 8), 1))  # each answers: fully loaded
            servers.append(server)
        rss, pss = [s.rss_mb() for s in servers], [s.pss_mb() for s in servers]
    with ServerProcess(bundles, ctx["work"], name="together", threads=ctx["threads"]) as server:
        warm(server, [b.name for b in bundles], texts)
        together = {"rss_mb": round(server.rss_mb(), 1), "pss_mb": round(server.pss_mb(), 1)}
    return {"processes": len(servers), "of": len(bundles), "rss_sum_mb": round(sum(rss), 1),
            "pss_sum_mb": round(sum(pss), 1), "rss_median_mb": round(median(rss), 1),
            "pss_median_mb": round(median(pss), 1), "one_server": together,
            "ratio_pss": round(sum(pss) / together["pss_mb"], 2)}


def table_processes(r: dict) -> str:
    n, of = r["processes"], r["of"]
    note = "" if n == of else f" (only {n} of {of} fitted beside {MIN_FREE_MB} MB free)"
    return md(["memory", "RSS MB", "PSS MB"], [
        [f"{of} specialists in one server", r["one_server"]["rss_mb"], r["one_server"]["pss_mb"]],
        [f"{n} one-specialist servers at once, summed{note}", r["rss_sum_mb"], r["pss_sum_mb"]],
        ["one of those servers (median)", r["rss_median_mb"], r["pss_median_mb"]],
        ["one server is smaller by (PSS)", "", f"{r['ratio_pss']}x"]])


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def part_batching(ctx: dict) -> dict:
    sources, ids, result = ctx["text"][1:2], [ctx["text"][1].name], {}
    for max_batch in (32, 1):
        with ServerProcess(sources, ctx["work"], name=f"batch-{max_batch}", threads=ctx["threads"],
                           max_batch=max_batch) as server:
            warm(server, ids, ctx["texts"])
            result[f"max_batch_{max_batch}"] = asyncio.run(
                drive(server, text_jobs(ids, ctx["texts"], 2 * ctx["size"]["requests"]), 32))
    result["gain"] = round(result["max_batch_32"]["req_per_s"] / result["max_batch_1"]["req_per_s"], 2)
    return result


def table_batching(r: dict) -> str:
    rows = [[k.replace("max_batch_", "max_batch="), v["req_per_s"], v["p50_ms"], v["p99_ms"], v["errors"]]
            for k, v in r.items() if k.startswith("max_batch")]
    rows.append(["gain", f"{r['gain']}x", "", "", f">= 3x: {verdict(r['gain'] >= 3)}"])
    return md(["server (concurrency 32)", "req/s", "p50 ms", "p99 ms", "errors / target"], rows)


def part_image(ctx: dict) -> dict:
    photos = build.photos(DATA, 24)
    jobs = [{"path": "/models/ants/predict", "content": photos[k % len(photos)],
             "headers": {"Content-Type": "image/jpeg"}} for k in range(ctx["size"]["image_requests"])]
    with ServerProcess([ctx["image"]], ctx["work"], name="image", threads=ctx["threads"]) as server:
        asyncio.run(drive(server, jobs[:16], 8))
        result = {"rss_mb": round(server.rss_mb(), 1)}
        for c in (1, 8):
            result[c] = asyncio.run(drive(server, jobs, c))
    return result


def table_image(r: dict) -> str:
    return md(["lite0 photos (raw JPEG)", "req/s", "p50 ms", "p99 ms", "errors", "server RSS MB"],
              [[f"concurrency {c}", r[c]["req_per_s"], r[c]["p50_ms"], r[c]["p99_ms"], r[c]["errors"], r["rss_mb"]]
               for c in (1, 8)])


async def chats(server: ServerProcess, prompts: list[str], max_tokens: int, seed: int) -> dict:
    async with server.client(len(prompts)) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream_chat(client, "chat", p, max_tokens, seed + i) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    return {"chats": len(runs), "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "per_chat_tokens_per_s": round(median(r["tokens"] / r["wall_s"] for r in runs), 2),
            "ttft_ms": round(1000 * median(r["ttft_s"] or r["wall_s"] for r in runs), 1)}


def part_llm(ctx: dict) -> dict:
    size, prompts = ctx["size"], build.chat_prompts(DATA, 8)
    with ServerProcess([ctx["chat"]], ctx["work"], name="llm", threads=ctx["threads"]) as server:
        asyncio.run(chats(server, prompts[:1], 4, 0))
        result: dict = {"base": json.loads((ctx["chat"] / "manifest.json").read_text())["base"]["name"],
                        "max_tokens": size["max_tokens"], "rss_mb": round(server.rss_mb(), 1)}
        for n in (1, 4):
            rounds = [asyncio.run(chats(server, prompts[k:k + n], size["max_tokens"], 100 * k))
                      for k in range(size["chat_rounds"])]
            result[n] = max(rounds, key=lambda x: x["tokens_per_s"]) | {"rounds": rounds}
    return result


def table_llm(r: dict) -> str:
    return md([f"{r['base']} sft, SSE stream", "tokens/s (all chats)", "tokens/s per chat", "first piece ms", "tokens"],
              [[f"{n} concurrent chat(s)", r[n]["tokens_per_s"], r[n]["per_chat_tokens_per_s"], r[n]["ttft_ms"],
                r[n]["tokens"]] for n in (1, 4)])


def part_load(ctx: dict) -> dict:
    rng, texts, size = random.Random(0), ctx["texts"], ctx["size"]
    ids, photos = [b.name for b in ctx["text"]], build.photos(DATA, 24)
    jobs = []
    for k in range(size["load"]):  # 90% text (a tenth of them lists of 4 questions), 10% photos
        if k % 10 == 9:
            jobs.append({"path": "/models/ants/predict", "content": rng.choice(photos),
                         "headers": {"Content-Type": "image/jpeg"}})
        else:
            inputs = rng.sample(texts, 4) if k % 10 == 4 else rng.choice(texts)
            jobs.append({"path": f"/models/{rng.choice(ids)}/predict", "json": {"inputs": inputs}})
    sources = [*ctx["text"], ctx["image"], ctx["chat"]]
    with ServerProcess(sources, ctx["work"], name="load", threads=ctx["threads"]) as server:
        warm(server, ids, texts)
        result = {"load": asyncio.run(drive(server, jobs, 32))}
        result["fuzz"] = asyncio.run(fuzz(server, fuzz_jobs(size["fuzz"], ids[0], "ants", "chat"), 8))
        result["health_after"] = asyncio.run(drive(server, text_jobs(ids, texts, 8), 1))["errors"] == 0
        result["rss_mb"] = round(server.rss_mb(), 1)
    return result


def table_load(r: dict) -> str:
    load, fz = r["load"], r["fuzz"]
    return md(["load", "requests", "req/s", "p50 ms", "p99 ms", "failures", "target"], [
        ["mixed specialists, concurrency 32", load["requests"], load["req_per_s"], load["p50_ms"], load["p99_ms"],
         load["errors"], f"0 errors: {verdict(load['errors'] == 0)}"],
        ["fuzzed bad requests, concurrency 8", fz["requests"], "", "", "", fz["server_errors"],
         f"0 5xx: {verdict(fz['server_errors'] == 0)} (answers: {fz['statuses']})"],
        ["server still answers after", "", "", "", "", "", verdict(r["health_after"])]])


def part_onnx(ctx: dict) -> dict:
    import headstart
    from headstart.bundle import commands
    from headstart.bundle.onnx_runtime import OnnxSpecialist

    bundle, folder, reps = ctx["text"][1], ctx["work"] / "onnx", ctx["size"]["onnx_reps"]
    pytorch = headstart.load(bundle)
    if hasattr(pytorch.model.backbone, "merge_and_unload"):
        # The ONNX file has the adapter merged in: time PyTorch the same way, not with the adapter beside the base.
        pytorch.model.backbone = pytorch.model.backbone.merge_and_unload()
    models = {"pytorch": pytorch}
    for kind in ("fp32", "int8"):
        path = folder / f"{bundle.name}-{kind}.onnx"
        if not Path(f"{path}.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            commands.export(bundle, path, onnx=True, int8=kind == "int8")
        models[f"onnx {kind}"] = OnnxSpecialist.load(path)
        if ctx["threads"]:  # the same cores for both runtimes (onnxruntime takes every core by default)
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads, options.log_severity_level = ctx["threads"], 3
            models[f"onnx {kind}"].session = ort.InferenceSession(str(path), options,
                                                                  providers=["CPUExecutionProvider"])
    import torch

    result: dict = {"bundle": bundle.name, "method": "lora, merged into the base in both runtimes", "torch_threads": torch.get_num_threads(),
                    "onnx_threads": ctx["threads"] or "onnxruntime default (physical cores)", "ms": {}}
    for name, model in models.items():
        result["ms"][name] = {}
        for batch in (1, 32):
            xs = ctx["texts"][:batch]
            model.predict_proba(xs)  # warm-up
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                model.predict_proba(xs)
                times.append(time.perf_counter() - t0)
            result["ms"][name][batch] = round(1000 * median(times), 3)
    result["speedup"] = {kind: {b: round(result["ms"]["pytorch"][b] / result["ms"][f"onnx {kind}"][b], 2)
                                for b in (1, 32)} for kind in ("fp32", "int8")}
    return result


def table_onnx(r: dict) -> str:
    rows = [["pytorch", r["ms"]["pytorch"][1], r["ms"]["pytorch"][32], "1.0x / 1.0x", ""]]
    for kind in ("fp32", "int8"):
        s = r["speedup"][kind]
        rows.append([f"onnx {kind}", r["ms"][f"onnx {kind}"][1], r["ms"][f"onnx {kind}"][32], f"{s[1]}x / {s[32]}x",
                     f">= {ANCHOR[kind]}x (sentence-transformers): batch 1 {verdict(s[1] >= ANCHOR[kind])}, "
                     f"batch 32 {verdict(s[32] >= ANCHOR[kind])}"])
    return md([f"{r['bundle']} ({r['method']}) in process", "batch 1 ms", "batch 32 ms", "speed-up (1 / 32)",
               "anchor"], rows)


# ---- main ------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, parts: list[str]) -> dict:
    size = SIZES["quick" if args.quick else "full"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    texts = [r["text"] for r in build.read_rows(DATA / "trec" / "test.csv")]
    ctx = {"work": work, "size": size, "threads": args.threads, "texts": texts}
    ctx["text"] = build.text_specialists(DATA, work, size["specialists"], size["per_slice"], size["epochs"], log)
    if {"image", "load"} & set(parts):
        ctx["image"] = build.image_specialist(DATA, work, size["photos_per_class"], log)
    if {"llm", "load"} & set(parts):
        ctx["chat"] = build.generator(DATA, work, args.quick, log)
    print(f"specialists ready under {work} in {time.perf_counter() - t0:.0f} s", flush=True)
    return ctx


def main() -> None:
    from headstart.core.storage import cache_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 specialists, few requests, tiny-llm: a smoke run")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--work", default=None, help="where specialists are built and reused (default: the headstart "
                                                "cache, bench/serve/{full,quick})")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of each server (default: torch's)")
    args = p.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.work = args.work or str(cache_dir("bench", "serve", "quick" if args.quick else "full"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the in-process ONNX / PyTorch comparison
    ctx = prepare(args, parts)
    out = REPO / "bench" / "results" / ("serve_quick.json" if args.quick else "serve.json")
    results = json.loads(out.read_text()) if out.exists() else {}
    results["settings"] = {**ctx["size"], "threads": args.threads, "cores": os.cpu_count(),
                           "date": time.strftime("%Y-%m-%d %H:%M")}
    results.setdefault("parts", {})
    for part in parts:
        t0 = time.perf_counter()
        print(f"\n== {part}", flush=True)
        result = globals()[f"part_{part}"](ctx)
        result["part_wall_s"] = round(time.perf_counter() - t0, 1)
        print(globals()[f"table_{part}"](result), flush=True)
        results["parts"][part] = json.loads(json.dumps(result, default=str))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
