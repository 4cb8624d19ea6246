"""Instruction tuning on a laptop CPU: LoRA and QLoRA SFT of smollm2-135m on alpaca_en_demo, vs TRL.

    python bench/sft.py                       # lora, qlora, then TRL's SFTTrainer (bench env: bench/requirements.txt)
    python bench/sft.py --methods lora --limit 200    # lora vs TRL on the first 200 rows (keys *_limit200)
    python bench/sft.py --memory-limit 8192 --no-trl  # every fit inside an 8 GB memory cgroup (killed above it)
    python bench/sft.py --limit 64 --baseline 2987ca8 --no-trl   # also the code of that revision, same rows
    python bench/sft.py --methods "" --trl-checkpointing off     # TRL alone, without checkpointing

Each run is a separate process (peak memory is per run): `headstart fit train.jsonl --task sft --method M
--eval test.jsonl --json`, 1 epoch, the same settings for TRL (LoRA r=8 alpha=16 all-linear, batch 8,
lr 2e-4, max_length 512, bf16 autocast when the CPU has it, loss on the answers only). Reports held-out
loss before/after, wall time, tokens/s, peak memory, and the 4-bit base's weight memory vs fp32.
Writes bench/results/sft.json and copies each bundle's side-by-side report to bench/results/sft/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo"
RESULTS = REPO / "bench" / "results"


GENERATE = """import json, sys, time
import headstart
spec = headstart.load(sys.argv[1])
prompts = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku about autumn."]
spec.generate(prompts[0], max_new_tokens=4)  # warm-up
n, t0 = 0, time.perf_counter()
for prompt in prompts:
    n += len(spec.tokenizer(spec.generate(prompt, max_new_tokens=int(sys.argv[2]), temperature=0))["input_ids"])
print(json.dumps({"gen_tokens": n, "gen_tokens_per_s": round(n / (time.perf_counter() - t0), 1)}))
"""


def headstart_command(baseline: Path | None) -> tuple[list[str], dict]:
    """The `headstart` CLI of this checkout, or of the `baseline` worktree (same environment, its own source)."""
    if baseline is None:
        return [str(Path(sys.executable).parent / "headstart")], dict(os.environ)
    return ([sys.executable, "-c", "import sys; from headstart.cli import main; sys.exit(main())"],
            {**os.environ, "PYTHONPATH": str(baseline / "src")})


def run_headstart(method: str, train: Path, test: Path, work: Path, epochs: int, extra: list[str] = (),
                  limit_mb: int | None = None, baseline: Path | None = None, generate_tokens: int = 0) -> dict:
    out = work / f"alpaca-{method}{'-baseline' if baseline else ''}"
    command, env = headstart_command(baseline)
    cmd = [*command, "fit", str(train), "--base", "smollm2-135m", "--task", "sft", "--method", method,
           "--eval", str(test), "--epochs", str(epochs), "--out", str(out), "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(limited(cmd, limit_mb), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        print(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": f"killed at the {limit_mb} MB limit" if killed and limit_mb else proc.stderr[-500:],
                "process_wall_s": round(time.perf_counter() - t0, 1), "memory_limit_mb": limit_mb}
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics["process_wall_s"] = round(time.perf_counter() - t0, 1)
    metrics["memory_limit_mb"] = limit_mb
    plan = [line for line in proc.stderr.splitlines() if line.startswith("memory plan:")]
    if plan:
        metrics["memory_plan"] = plan[0]
    report = out / "report" / "side_by_side.md"
    if report.exists() and not extra and baseline is None:
        (RESULTS / "sft").mkdir(parents=True, exist_ok=True)
        shutil.copy(report, RESULTS / "sft" / f"{method}_side_by_side.md")
    if generate_tokens:
        gen = subprocess.run([sys.executable, "-c", GENERATE, str(out), str(generate_tokens)], capture_output=True,
                             text=True, env=env)
        metrics.update(json.loads(gen.stdout.strip().splitlines()[-1]) if gen.returncode == 0
                       else {"gen_error": gen.stderr[-500:]})
    return metrics


def run_dpo(sft_bundle: Path, work: Path, pairs: int, limit_mb: int | None) -> dict:
    """DPO from the lora bundle on `pairs` alpaca prompts: chosen = the reference answer, rejected = the next
    row's answer (a fluent answer to another question). Here for its memory and speed beside SFT's;
    bench/dpo.py is the DPO benchmark on real (SPIN) preference pairs."""
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()[:pairs + 1]]
    prefs = work / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": (r["instruction"] + "\n\n" + r["input"]).strip(),
                                         "chosen": r["output"], "rejected": rows[i + 1]["output"]}) + "\n"
                             for i, r in enumerate(rows[:pairs])))
    command, env = headstart_command(None)
    cmd = [*command, "fit", str(prefs), "--task", "dpo", "--init", str(sft_bundle), "--side-by-side", "0",
           "--out", str(work / "alpaca-dpo"), "--json"]
    proc = subprocess.run(limited(cmd, limit_mb), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-500:]}
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics["memory_plan"] = next((line for line in proc.stderr.splitlines() if line.startswith("memory plan:")), "")
    return metrics


def limited(cmd: list[str], limit_mb: int | None) -> list[str]:
    """`cmd` run inside a fresh memory cgroup with a hard limit of `limit_mb` (the kernel kills it above)."""
    if not limit_mb:
        return cmd
    line = next(l for l in Path("/proc/self/cgroup").read_text().splitlines()
                if l.startswith("0::") or ":memory:" in l)
    v2 = line.startswith("0::")
    root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
    group = root / line.split(":", 2)[2].lstrip("/") / f"headstart-bench-{os.getpid()}-{limit_mb}"
    try:
        group.mkdir(exist_ok=True)
        (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit_mb << 20))
    except OSError as e:
        raise SystemExit(f"--memory-limit needs a writable memory cgroup ({group}): {e}")
    return ["bash", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "limited", *cmd]


def run_trl(train: Path, test: Path, epochs: int, checkpointing: str = "on") -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sft_trl.py"), str(train), str(test), str(epochs),
                           checkpointing], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="lora,qlora")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--trl-checkpointing", choices=("on", "off"), default="on",
                   help="TRL's gradient checkpointing: on (its default) or off (its fastest on a CPU)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training rows (a quick check)")
    p.add_argument("--memory-limit", type=int, default=None, metavar="MB",
                   help="run every headstart fit inside a memory cgroup with this hard limit (e.g. 8192)")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also run the headstart code of this git revision on the same rows (keys *_baseline)")
    p.add_argument("--dpo", type=int, default=0, metavar="PAIRS", help="also DPO from the lora bundle on this many pairs")
    p.add_argument("--generate", type=int, default=64, help="greedy tokens per prompt to time generation (0: skip)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hs-sft-"))
    train, test = DATA / "train.jsonl", DATA / "test.jsonl"
    if args.limit:
        train = work / "train.jsonl"
        train.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:args.limit]))
    out_path = RESULTS / "sft.json"
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    previous_settings = result.get("settings")
    result["settings"] = {"epochs": args.epochs, "train_rows": sum(1 for _ in open(train)), "cores": os.cpu_count(),
                          "date": time.strftime("%Y-%m-%d"), "memory_limit_mb": args.memory_limit,
                          "baseline": args.baseline}
    # A --limit or --memory-limit run is a separate comparison: its results go under their own keys
    # ("lora_limit200", "lora_mem8192", ...).
    suffix = (f"_limit{args.limit}" if args.limit else "") + (f"_mem{args.memory_limit}" if args.memory_limit else "")
    if suffix:
        result[f"settings{suffix}"] = result.pop("settings")
        result["settings"] = previous_settings
    extra = ["--side-by-side", "0"] if args.limit else []
    baseline = None
    if args.baseline:
        baseline = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
    try:
        methods = [m for m in args.methods.split(",") if m]  # --methods "" runs TRL alone
        runs = [(m, None) for m in methods] + [(m, baseline) for m in methods if baseline]
        for method, source in runs:
            key = method + ("_baseline" if source else "") + suffix
            print(f"== headstart {key}", flush=True)
            result[key] = run_headstart(method, train, test, work, args.epochs, extra, args.memory_limit, source,
                                        args.generate)
            print(json.dumps(result[key]), flush=True)
            out_path.write_text(json.dumps(result, indent=2))
    finally:
        if baseline is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], capture_output=True)
    if args.dpo and "lora" + suffix in result and "error" not in result["lora" + suffix]:
        print(f"== headstart dpo{suffix} ({args.dpo} pairs, from the lora bundle)", flush=True)
        result["dpo" + suffix] = run_dpo(work / "alpaca-lora", work, args.dpo, args.memory_limit)
        print(json.dumps(result["dpo" + suffix]), flush=True)
        out_path.write_text(json.dumps(result, indent=2))
    if not args.no_trl:
        print(f"== TRL SFTTrainer (lora){suffix}", flush=True)
        result["trl_lora" + suffix] = run_trl(train, test, args.epochs, args.trl_checkpointing)
        result["trl_lora" + suffix]["date"] = time.strftime("%Y-%m-%d")
        if not methods and not suffix:  # TRL alone: the headstart results of the last full run keep their settings
            result["settings"] = previous_settings
        print(json.dumps(result["trl_lora" + suffix]), flush=True)
        out_path.write_text(json.dumps(result, indent=2))
    print(table(result, suffix))
    print(f"wrote {out_path}")


def table(r: dict, suffix: str = "") -> str:
    rows = ["| run | eval loss before | eval loss after | wall s | tokens/s | peak MB | limit MB | generation tok/s | "
            "base weights MB |", "|---|---|---|---|---|---|---|---|---|"]
    for key in ("lora", "qlora", "lora_baseline", "qlora_baseline", "dpo", "trl_lora"):
        key += suffix
        m = r.get(key)
        if not m:
            continue
        if "error" in m:
            rows.append(f"| {key} | {m['error'][:80]} | | {m.get('process_wall_s', '')} | | | {m.get('memory_limit_mb')} | | |")
            continue
        if key.startswith("dpo"):  # a preference loss: not comparable with the answer losses above
            m = {**m, "eval_loss_before": m.get("eval_dpo_loss_before", float("nan")), "eval_loss": m["eval_dpo_loss"]}
        rows.append(f"| {key} | {m.get('eval_loss_before', float('nan')):.4f} | {m['eval_loss']:.4f} | "
                    f"{m.get('wall_s', m.get('train_s', 0)):.0f} | {m['tokens_per_s']:.0f} | {m['peak_mem_mb']:.0f} | "
                    f"{m.get('memory_limit_mb') or '-'} | {m.get('gen_tokens_per_s', '-')} | {m.get('base_weight_mb', '-')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
