"""Start-up benchmark: how long the `headstart` command takes before and around the real work.

    python bench/startup.py                 # median of 5 fresh processes each; writes bench/results/startup.json
    python bench/startup.py --runs 3 --top 25
    python bench/startup.py --profile       # also cProfile one warm re-fit: where its time goes, by function

Measures, each in fresh processes from the shell (process wall time, as a user waits for it):
  * `headstart --help`                                                   target <= 1.5 s
  * a warm probe re-fit: `headstart fit <hymenoptera> --base efficientnet-lite0 --method probe`, run once
    untimed to fill a private HEADSTART_CACHE, then timed on the cached features          target <= 5 s
and an import-time breakdown of both (`python -X importtime`: the modules with the largest cumulative
import time), so a regression names the import that caused it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
RESULTS = ROOT / "bench" / "results" / "startup.json"
HEADSTART = [sys.executable, "-m", "headstart.cli"]
TARGETS = {"help": 1.5, "warm_refit": 5.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="fresh processes per measurement (the median is reported)")
    p.add_argument("--top", type=int, default=15, help="modules listed in each import-time breakdown")
    p.add_argument("--data", default=str(DATA), help="image folder for the probe re-fit")
    p.add_argument("--cache", default=None, help="HEADSTART_CACHE for the re-fit (default: a fresh temp folder)")
    p.add_argument("--profile", action="store_true", help="cProfile one warm re-fit and print its costliest calls")
    args = p.parse_args()

    cache = args.cache or tempfile.mkdtemp(prefix="hs-startup-cache-")
    env = {**os.environ, "HEADSTART_CACHE": cache}
    commands = {"help": [*HEADSTART, "--help"],
                "warm_refit": [*HEADSTART, "fit", args.data, "--base", "efficientnet-lite0", "--method", "probe"]}
    print(f"filling the feature cache {cache} (one untimed fit)...", flush=True)
    _run(commands["warm_refit"], env)

    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                          "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "runs": args.runs, "data": args.data, "targets_s": TARGETS, "results": {}}
    for name, cmd in commands.items():
        walls = [_run(cmd, env) for _ in range(args.runs)]
        imports = import_breakdown(cmd, env, args.top)
        report["results"][name] = {"command": " ".join(cmd[2:]), "median_s": round(statistics.median(walls), 3),
                                   "runs_s": [round(w, 3) for w in walls], "target_s": TARGETS[name],
                                   "met": statistics.median(walls) <= TARGETS[name], "imports": imports}
    if args.profile:
        report["profile"] = profile(commands["warm_refit"], env, args.top)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_report(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall


def import_breakdown(cmd: list[str], env: dict[str, str], top: int) -> dict:
    """Total import time and the `top` modules by cumulative import time, from `python -X importtime`."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, env=env)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, self_us, cumulative_us, name = line.replace("import time:", "|").split("|")
        name = name[1:]  # one space after the bar, then two more per level of nesting
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append({"module": name.strip(), "depth": depth, "self_s": int(self_us) / 1e6,
                     "cumulative_s": int(cumulative_us) / 1e6})
    total = sum(r["cumulative_s"] for r in rows if r["depth"] == 0)
    heaviest = sorted(rows, key=lambda r: -r["cumulative_s"])[:top]
    return {"total_s": round(total, 3), "modules": len(rows),
            "top": [{**r, "self_s": round(r["self_s"], 3), "cumulative_s": round(r["cumulative_s"], 3)}
                    for r in heaviest]}


def profile(cmd: list[str], env: dict[str, str], top: int) -> list[dict]:
    """The `top` headstart functions of one run by cumulative time (cProfile), with who they import through."""
    import pstats

    with tempfile.TemporaryDirectory() as tmp:
        stats_file = str(Path(tmp) / "refit.prof")
        subprocess.run([cmd[0], "-m", "cProfile", "-o", stats_file, *cmd[1:]], capture_output=True, env=env,
                       check=True)
        stats = pstats.Stats(stats_file).stats  # type: ignore[attr-defined]
    rows = [{"function": f"{Path(file).relative_to(ROOT / 'src') if str(file).startswith(str(ROOT)) else file}"
                         f":{line}({name})", "calls": calls, "cumulative_s": round(cumulative, 3)}
            for (file, line, name), (_, calls, _, cumulative, _) in stats.items()
            if "/src/headstart/" in str(file)]
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:top]


def print_report(report: dict) -> None:
    load = report["machine"]
    print(f"\nload average (1, 5, 15 min) at start {load['load_average_at_start']}, at end {load['load_average_at_end']} "
          f"on {load['cpus']} CPUs: other work on the machine slows every figure")
    print(f"\n{'measurement':<14}{'median (s)':>11}{'target (s)':>12}  {'met':<5}runs (s)")
    for name, r in report["results"].items():
        runs = " ".join(f"{w:.2f}" for w in r["runs_s"])
        print(f"{name:<14}{r['median_s']:>11.2f}{r['target_s']:>12.1f}  {'yes' if r['met'] else 'NO':<5}{runs}")
    for name, r in report["results"].items():
        imp = r["imports"]
        print(f"\nimports of `{r['command']}`: {imp['total_s']:.2f} s over {imp['modules']} modules; "
              "largest cumulative (depth 0 = imported by headstart or the interpreter directly):")
        print(f"  {'cumulative (s)':>14}{'self (s)':>10}  depth  module")
        for m in imp["top"]:
            print(f"  {m['cumulative_s']:>14.3f}{m['self_s']:>10.3f}  {m['depth']:>5}  {m['module']}")
    if "profile" in report:
        print("\nwarm re-fit, headstart functions by cumulative time (cProfile; imports inside them included):")
        for r in report["profile"]:
            print(f"  {r['cumulative_s']:>8.3f} s  {r['calls']:>6} calls  {r['function']}")


if __name__ == "__main__":
    main()
