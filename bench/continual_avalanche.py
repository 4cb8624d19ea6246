"""The same-run anchor of issue 13: Avalanche's Naive, EWC, LwF and Replay on headstart's class-incremental
streams (banking, caltech), with frozen features and a linear head.

    .venv/bin/python bench/continual_avalanche.py --stream banking --seeds 0 [--quick]

Benchmark environment only (`pip install -r bench/requirements.txt`); headstart never imports Avalanche.
The features come from headstart's own frozen base (minilm-l6 / efficientnet-lite0) through its feature
cache, extracted once per stream; the model is one `nn.Linear(D, all classes)` on features standardised
with night 1's training statistics (as headstart's probe head sees them). Training: Adam, the update
settings of headstart's head (lr 5e-3, weight decay 1e-4, 30 epochs, batch 32) and its strategy strengths
(EWC online, lambda 100, decay 0.9; LwF alpha 1, T 2; Replay 1000 examples). Evaluation is ours, not
Avalanche's: after each night, argmax over the classes seen so far (a growing head never predicts an
unseen class; Avalanche's IncrementalClassifier masks the same way), on each seen night's test rows.
Writes bench/results/continual_avalanche_<stream>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import continual_metrics as cm  # noqa: E402
from continual_streams import build_stream  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"optimizer": "Adam", "lr": 5e-3, "weight_decay": 1e-4, "epochs": 30, "batch_size": 32,
            "ewc": {"ewc_lambda": 100.0, "mode": "online", "decay_factor": 0.9},
            "lwf": {"alpha": 1.0, "temperature": 2.0}, "replay": {"mem_size": 1000},
            "model": "nn.Linear(D, all classes) on standardised frozen features",
            "evaluation": "argmax over the classes seen so far"}
STRATEGIES = ("naive", "ewc", "lwf", "replay")


def import_avalanche():
    """Avalanche's modules, or SystemExit with the reason. Its confusion-matrix module imports `wandb` at
    import time only to offer a W&B logger we never use; a stub module stands in when wandb is absent."""
    import importlib.util

    # Its "no loggers" notice and the replay buffer's deprecation notice, once per night, are noise here.
    warnings.filterwarnings("ignore", module=r"avalanche\.")
    stub = importlib.util.find_spec("wandb") is None
    if stub:
        sys.modules["wandb"] = types.ModuleType("wandb")
    try:
        from avalanche.benchmarks import tensors_benchmark
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.supervised import EWC, LwF, Naive, Replay
    except ImportError as e:
        raise SystemExit(f"avalanche-lib is not importable in this environment ({e}); "
                         "install the bench requirements: pip install -r bench/requirements.txt") from None
    finally:
        if stub:  # others (accelerate) probe for wandb with find_spec: a stub without a spec breaks them
            del sys.modules["wandb"]
    return types.SimpleNamespace(tensors_benchmark=tensors_benchmark, EvaluationPlugin=EvaluationPlugin,
                                 naive=Naive, ewc=EWC, lwf=LwF, replay=Replay)


def stream_features(stream, log=print) -> dict:
    """Per night: train/test features [N, D] and global label indices (classes numbered in night order)."""
    import headstart
    from headstart.data import load_eval_dataset
    from headstart.engine.features import cached_features
    from headstart.methods.base import loader_for

    backbone = headstart.load_base(stream.base)
    classes: list[str] = []
    nights = []
    for night in stream.nights:
        parts = {}
        for split, path in (("train", night.train), ("test", night.test)):
            data = load_eval_dataset(path)
            items = [x for s in data.splits.values() for x in s.items]
            names = [data.classes[y] for s in data.splits.values() for y in s.labels]
            for name in names:
                if name not in classes:
                    classes.append(name)
            x, _ = cached_features(backbone, items, loader_for(backbone.kind), progress=False)
            parts[split] = (x.float(), torch.tensor([classes.index(n) for n in names]))
        nights.append(parts)
        log(f"avalanche: features of {night.name}: {len(parts['train'][1])} train, {len(parts['test'][1])} test")
    return {"classes": classes, "nights": nights, "dim": nights[0]["train"][0].shape[1]}


def _strategy(av, name: str, model: torch.nn.Module, seed: int):
    optimizer = torch.optim.Adam(model.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
    common = dict(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                  train_mb_size=SETTINGS["batch_size"], train_epochs=SETTINGS["epochs"], device="cpu",
                  evaluator=av.EvaluationPlugin(loggers=[]), eval_every=-1)
    extra = {"naive": {}, "ewc": SETTINGS["ewc"], "lwf": SETTINGS["lwf"], "replay": SETTINGS["replay"]}[name]
    return getattr(av, name)(**common, **extra)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seen: int) -> float:
    logits = model(x)[:, :seen]
    return (logits.argmax(-1) == y).float().mean().item()


def run_avalanche(av, feats: dict, name: str, seed: int) -> dict:
    """One strategy over the stream: R matrix, per-night wall time."""
    torch.manual_seed(seed)
    nights = feats["nights"]
    train0 = nights[0]["train"][0]
    mu, sd = train0.mean(0), train0.std(0).clamp_min(1e-6)
    z = [{k: ((v[0] - mu) / sd, v[1]) for k, v in n.items()} for n in nights]
    bench = av.tensors_benchmark(train_tensors=[list(n["train"]) for n in z], test_tensors=[list(n["test"]) for n in z],
                                 task_labels=[0] * len(z))
    model = torch.nn.Linear(feats["dim"], len(feats["classes"]))
    strategy = _strategy(av, name, model, seed)
    R, walls = [], []
    seen = 0
    for i, experience in enumerate(bench.train_stream):
        seen = max(seen, int(nights[i]["train"][1].max()) + 1)
        t0 = time.perf_counter()
        strategy.train(experience)
        walls.append(round(time.perf_counter() - t0, 3))
        model.eval()
        R.append([_accuracy(model, *z[j]["test"], seen) if j <= i else None for j in range(len(z))])
    return {"R": R, "wall_s": walls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", choices=("banking", "caltech"), required=True)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="one seed (the first), smaller test sets (caltech: 10 "
                                                        "photos a class): the streams of continual.py --quick")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/continual_avalanche_<stream>.json)")
    p.add_argument("--compare", default=None, help="a bench/continual.py JSON of the same stream: adds the "
                                                   "issue's target (headstart >= Avalanche's same strategy - 1 std)")
    args = p.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    av = import_avalanche()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)}: choose from {', '.join(STRATEGIES)}")
    runs: dict[str, list[dict]] = {s: [] for s in strategies}
    with tempfile.TemporaryDirectory(prefix="hs-continual-avalanche-") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]:
            stream = build_stream(args.stream, Path(tmp), seed=seed, quick=args.quick)
            feats = stream_features(stream, log)
            sizes = [n.test_size for n in stream.nights]
            for name in strategies:
                run = run_avalanche(av, feats, name, seed)
                run.update(seed=seed, summary=cm.summarise(run["R"], sizes))
                runs[name].append(run)
                log(f"avalanche {name} seed {seed}: ACC {run['summary']['acc']:.3f} BWT {run['summary']['bwt']:+.3f}")
    report = {"stream": args.stream, "library": f"avalanche-lib {_version()}", "settings": SETTINGS,
              "quick": args.quick, "strategies": {s: {"runs": r, "aggregate": cm.aggregate([x["summary"] for x in r])}
                                                  for s, r in runs.items()}}
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else RESULTS / f"continual_avalanche_{args.stream}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if args.compare:
        report["versus_headstart"] = compare(report, json.loads(Path(args.compare).read_text()))
        out.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    log(f"wrote {out}")


def compare(avalanche: dict, headstart: dict) -> list[dict]:
    """Per strategy both libraries ran: final ACC mean/std, and whether headstart's mean is at least
    Avalanche's minus one (the larger) std -- the issue's "within one std" target."""
    rows = []
    for name, entry in avalanche["strategies"].items():
        ours = headstart["results"].get(name, {}).get("aggregate")
        if ours is None:
            continue
        theirs = entry["aggregate"]["acc"]
        slack = max(theirs["std"], ours["acc"]["std"])
        rows.append({"strategy": name, "headstart_acc": ours["acc"], "avalanche_acc": theirs,
                     "headstart_max_forgetting": ours["max_forgetting"],
                     "avalanche_max_forgetting": entry["aggregate"]["max_forgetting"],
                     "met": ours["acc"]["mean"] >= theirs["mean"] - slack})
    return rows


def format_table(report: dict) -> str:
    lines = [f"## {report['stream']}: {report['library']} (frozen features + linear head)", "",
             "| strategy | ACC % | BWT pts | max forgetting pts | wall s / night |", "|---|---|---|---|---|"]
    for name, entry in report["strategies"].items():
        agg = entry["aggregate"]
        wall = sum(sum(r["wall_s"]) / len(r["wall_s"]) for r in entry["runs"]) / len(entry["runs"])
        lines.append(f"| avalanche-{name} | {_pm(agg['acc'])} | {_pm(agg['bwt'])} | {_pm(agg['max_forgetting'])} "
                     f"| {wall:.2f} |")
    if report.get("versus_headstart"):
        lines += ["", "| strategy | headstart ACC % | Avalanche ACC % | target (>= Avalanche - 1 std) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['strategy']} | {_pm(r['headstart_acc'])} | {_pm(r['avalanche_acc'])} | "
                  f"{'met' if r['met'] else 'NOT met'} |" for r in report["versus_headstart"]]
    return "\n".join(lines)


def _pm(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _version() -> str:
    from importlib.metadata import version

    return version("avalanche-lib")


if __name__ == "__main__":
    main()
