"""Instruction tuning on a laptop CPU: LoRA and QLoRA SFT of smollm2-135m on alpaca_en_demo, vs TRL.

    python bench/sft.py                       # lora, qlora, then TRL's SFTTrainer (bench env: bench/requirements.txt)
    python bench/sft.py --methods lora --limit 200    # lora vs TRL on the first 200 rows (keys *_limit200)

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


def run_headstart(method: str, train: Path, test: Path, work: Path, epochs: int, extra: list[str] = ()) -> dict:
    out = work / f"alpaca-{method}"
    cmd = [str(Path(sys.executable).parent / "headstart"), "fit", str(train), "--base", "smollm2-135m", "--task", "sft",
           "--method", method, "--eval", str(test), "--epochs", str(epochs), "--out", str(out), "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics["process_wall_s"] = round(time.perf_counter() - t0, 1)
    report = out / "report" / "side_by_side.md"
    if report.exists() and not extra:
        (RESULTS / "sft").mkdir(parents=True, exist_ok=True)
        shutil.copy(report, RESULTS / "sft" / f"{method}_side_by_side.md")
    return metrics


def run_trl(train: Path, test: Path, epochs: int) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sft_trl.py"), str(train), str(test), str(epochs)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="lora,qlora")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training rows (a quick check)")
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
                          "date": time.strftime("%Y-%m-%d")}
    # A --limit run is a separate comparison: its results go under their own keys ("lora_limit200", ...).
    suffix = f"_limit{args.limit}" if args.limit else ""
    if suffix:
        result[f"settings{suffix}"] = result.pop("settings")
        result["settings"] = previous_settings
    extra = ["--side-by-side", "0"] if args.limit else []
    for method in args.methods.split(","):
        print(f"== headstart {method}{suffix}", flush=True)
        result[method + suffix] = run_headstart(method, train, test, work, args.epochs, extra)
        print(json.dumps(result[method + suffix]), flush=True)
        out_path.write_text(json.dumps(result, indent=2))
    if not args.no_trl:
        print(f"== TRL SFTTrainer (lora){suffix}", flush=True)
        result["trl_lora" + suffix] = run_trl(train, test, args.epochs)
        print(json.dumps(result["trl_lora" + suffix]), flush=True)
        out_path.write_text(json.dumps(result, indent=2))
    print(table(result, suffix))
    print(f"wrote {out_path}")


def table(r: dict, suffix: str = "") -> str:
    rows = ["| run | eval loss before | eval loss after | wall s | tokens/s | peak MB | base weights MB |",
            "|---|---|---|---|---|---|---|"]
    for key in ("lora", "qlora", "trl_lora"):
        key += suffix
        m = r.get(key)
        if not m or "error" in m:
            continue
        rows.append(f"| {key} | {m.get('eval_loss_before', float('nan')):.4f} | {m['eval_loss']:.4f} | "
                    f"{m.get('wall_s', m.get('train_s', 0)):.0f} | {m['tokens_per_s']:.0f} | {m['peak_mem_mb']:.0f} | "
                    f"{m.get('base_weight_mb', '-')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
