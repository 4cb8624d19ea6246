"""Do headstart's CPU defaults help? EfficientNet-Lite0 training steps with and without
channels_last and glibc malloc tuning, each combination in its own process.

    .venv/bin/python bench/cpu_settings.py          # prints a table, writes bench/results/cpu_settings.json
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 12, 16


def one_run(channels_last: bool) -> dict:
    import torch

    import headstart
    from headstart.engine.perf import tune_allocator

    tuned = tune_allocator()  # a no-op when HEADSTART_NO_MALLOC_TUNING is set
    base = headstart.load_base("efficientnet-lite0")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base.to(memory_format=fmt).train()
    head = torch.nn.Linear(base.feature_dim, 2)
    opt = torch.optim.AdamW([*base.parameters(), *head.parameters()], lr=1e-4)
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (BATCH,))
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(head(base(pixel_values=x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"malloc_tuned": tuned, "channels_last": channels_last, "step_s": statistics.median(times[2:])}


def main() -> None:
    rows = []
    for malloc in (True, False):
        for cl in (True, False):
            env = {**os.environ}
            env.pop("MALLOC_MMAP_MAX_", None)
            env.pop("MALLOC_TRIM_THRESHOLD_", None)
            if not malloc:
                env["HEADSTART_NO_MALLOC_TUNING"] = "1"
            out = subprocess.run([sys.executable, __file__, "--one", "1" if cl else "0"], env=env, capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = rows[0]["step_s"]
    print(f"{'malloc tuned':<14}{'channels_last':<15}{'s/step (batch 16)':>18}{'vs default':>12}")
    for r in rows:
        print(f"{str(r['malloc_tuned']):<14}{str(r['channels_last']):<15}{r['step_s']:>18.3f}{r['step_s'] / best:>11.2f}x")
    out = ROOT / "bench" / "results" / "cpu_settings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": STEPS, "batch": BATCH, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one_run(sys.argv[2] == "1")))
    else:
        main()
