"""What each command prints: a human table, or with `--json` one JSON object on the last stdout line
(progress and logs then go to stderr). The API functions return values; only these functions print."""
from __future__ import annotations

import dataclasses
import json
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any


def bases(specs: list, args: Namespace) -> None:
    rows = [_base_row(spec) for spec in specs]
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        note = "" if r["available"] else f"  ({'' if r.get('downloads_on_first_use') else 'unavailable: '}{r['why']})"
        print(f"{r['name']:<20}{r['kind']:<11}{params:>8}  {r['source']}{note}")


def _base_row(spec) -> dict[str, Any]:
    """A listing row from the base's static facts (no base is built to list it)."""
    if hasattr(spec, "to_json"):
        return spec.to_json()
    # Registries without static facts: build the base once to count its weights.
    from ..bases import load_base
    from ..core.errors import HeadstartError

    try:
        info = load_base(spec.name).info
        return {"name": spec.name, "kind": spec.kind, "params": info.params, "source": spec.source,
                "sha256": info.sha256, "available": True}
    except HeadstartError as e:
        return {"name": spec.name, "kind": spec.kind, "params": None, "source": spec.source, "available": False,
                "why": str(e)}


def methods(specs: list, args: Namespace) -> None:
    from .options import field_docs

    for spec in specs:
        print(f"{spec.name:<14}{spec.summary}")
        docs = field_docs(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            print(f"    --{f.name.replace('_', '-'):<20}{docs.get(f.name, '')}")


def fit(specialist, args: Namespace) -> None:
    if not getattr(specialist, "is_main_process", True):
        return  # under `accelerate launch`: one JSON line, from the main process
    metrics = specialist.manifest["metrics"]
    if "accuracy" in metrics:  # a classifier: fit has logged its report; --json adds the headline numbers
        from ..core.report import headline

        if args.json:
            print(json.dumps(headline(metrics)))
        return
    print(json.dumps(metrics, default=float, indent=None if args.json else 2))


def shots(result: dict, args: Namespace) -> None:
    from ..core.errors import HeadstartError
    from ..experiments.shots import format_shots_table

    log = _log(args)
    log("\n" + format_shots_table(result))
    if args.out:
        log(f"wrote {Path(args.out) / 'shots.json'}, shots.md, shots.png")
    if not result["results"]:
        raise HeadstartError("no run succeeded; see the errors above")
    if args.json:
        print(json.dumps({"results": result["results"]}))


def adapt(run, args: Namespace) -> None:
    if args.json:
        print(json.dumps({k: v for k, v in run.report.items() if k != "target_metrics"}, default=float))


def rank(ranking, args: Namespace) -> None:
    log = _log(args)
    log(ranking.table())
    best = ranking.best()
    log(f"best by {ranking.by}: {best.base} (layer {best.layer}); ranked {len(ranking.candidates)} candidate(s) "
        f"in {ranking.wall_s:.1f} s")
    if args.json:
        print(json.dumps(ranking.to_json(), default=float))


def evaluate(m: dict, args: Namespace) -> None:
    if args.json:
        print(json.dumps(m, default=float))
    elif "perplexity" in m:  # a generator bundle
        print(f"{args.bundle} on {args.data} ({m['examples']} examples, {m['response_tokens']} answer tokens)")
        print(f"loss        {m['loss']:.4f}\nperplexity  {m['perplexity']:.2f}")
    else:
        print(f"{args.bundle} on {args.data} ({m['split']}, {m['examples']} examples)")
        print(f"accuracy  {m['accuracy']:.4f}\nmacro-F1  {m['macro_f1']:.4f}")
        for c, f1 in m["per_class_f1"].items():
            print(f"  {c:<20}F1 {f1:.4f}")


def predict(rows: list[dict], args: Namespace) -> None:
    if args.json:
        print(json.dumps({"predictions": rows}))
        return
    for r in rows:
        if "answer" in r:  # a generator bundle
            print(f"{r['input']}\n{r['answer']}\n")
            continue
        alts = "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"][1:])
        print(f"{r['label']}\t{r['score']:.3f}\t{r['input']}" + (f"\t({alts})" if alts else ""))


def info(i: dict, args: Namespace) -> None:
    from ..bundle.commands import describe

    print(json.dumps(i, default=str) if args.json else describe(args.folder))


def generate(answer: str | None, args: Namespace) -> None:
    if args.json:
        print(json.dumps({"answer": answer}))
    else:
        print()  # the answer was streamed as it was produced


def export(out, args: Namespace) -> None:
    if getattr(args, "onnx", False):
        print(f"wrote {out} and its preprocessing contract {out}.json (runs with onnxruntime: "
              f"`headstart predict {out} ...`)", file=sys.stderr)
    elif getattr(args, "merged", True):
        print(f"wrote {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    else:
        print(f"wrote {out} (a PEFT adapter folder: peft.PeftModel.from_pretrained(base, {str(out)!r}))",
              file=sys.stderr)


def nothing(result: Any, args: Namespace) -> None:
    """The function logs what it did (`corrupt`)."""


def _log(args: Namespace):
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda s: print(s, file=stream, flush=True)


def update(report: dict, args: Namespace) -> None:
    if args.json:
        print(json.dumps(report, default=float))
        return
    print(update_line(report))


def update_line(r: dict) -> str:
    """One line for a nightly log: what happened, on how much, and the worst guard figure."""
    if r.get("nothing_new"):
        return f"{r['bundle']}: {r['why']} ({r.get('already_learned', 0)} examples already learned); version {r['version']} stays"
    worst = max((g["drop"] for g in r.get("guards", {}).values() if g.get("drop") is not None), default=None)
    unit = "% held-out loss rise" if r.get("scenario") == "generative" else " accuracy points"
    guard = f", worst guard drop {worst:+.1f}{unit}" if worst is not None else ", no guard set yet"
    head = (f"{r['bundle']}: version {r['version']} accepted" if r["accepted"]
            else f"{r['bundle']}: REJECTED ({r.get('why_rejected')}); version {r['version']} stays current")
    labels = f", new labels {', '.join(r['new_labels'])}" if r.get("new_labels") else ""
    return (f"{head} -- {r['scenario']} night, {r['examples']} new examples ({r.get('held_back', 0)} held back), "
            f"strategy {r['strategy']}{' (retried at 10x)' if r.get('retried') else ''}{labels}{guard}, "
            f"{r['wall_s']:.1f} s")


def history(rows: list[dict], args: Namespace) -> None:
    if args.json:
        print(json.dumps(rows, default=str))
        return
    loss = any(r.get("loss") is not None for r in rows)  # a generator: held-out loss, guards in loss too
    what = "loss" if loss else "accuracy"
    print(f"{'':2}{'version':<9}{'parent':<8}{'created':<22}{'strategy':<14}{'examples':>9}{what:>10}  "
          f"guards ({'held-out loss' if loss else 'accuracy %'} after)")
    for r in rows:
        mark = "*" if r.get("current") else ("x" if not r.get("accepted", True) else " ")
        acc = r.get(what)
        guards = ", ".join(f"n{k} {g.get('after', 0):.{3 if loss else 1}f}" for k, g in (r.get("guards") or {}).items()
                           if isinstance(g, dict) and g.get("after") is not None)
        print(f"{mark:2}{str(r.get('version') or '-'):<9}{str(r.get('parent') or '-'):<8}{str(r.get('created')):<22}"
              f"{str(r.get('strategy') or '-'):<14}{r.get('examples', 0):>9}"
              f"{(f'{acc:.4f}' if isinstance(acc, (int, float)) else '-'):>10}  {guards}"
              + (f"  rejected: {r.get('why')}" if not r.get("accepted", True) else ""))


def rollback(version: int, args: Namespace) -> None:
    print(f"{args.bundle}: version {version} is current")


def diff(d: dict, args: Namespace) -> None:
    print(json.dumps(d, default=str, indent=None if args.json else 2))


def merge(r: dict, args: Namespace) -> None:
    """The merge's table: each specialist alone, then the merged one per task (old head / refitted / kept)."""
    if args.json:
        print(json.dumps(r, default=float))
        return
    print(f"{'specialist':<40} {'task':<16} {'held-out acc':>12}")
    for row in r.get("ingredients", []):
        acc = f"{row['eval']['accuracy']:.4f}" if row.get("eval") else "-"
        print(f"{row['bundle'][-40:]:<40} {str(row.get('task') or '-'):<16} {acc:>12}")
    print(f"merged: {r['recipe']['label']}")
    for name, t in r.get("tasks", {}).items():
        refit = f"{t['refit']['accuracy']:.4f}" if "refit" in t else "-"
        alone = f", alone {t['alone']:.4f}, normalized {t['normalized']:.3f}" if "normalized" in t else ""
        print(f"  {name:<16} old head {t['kept']['accuracy']:.4f}, refitted {refit}, kept the {'old' if t['head'] == 'kept' else 'refitted'} head"
              f"{alone}")
    if r.get("bundle"):
        energy = f", energy kept >= {r['energy']['min']:.4f}" if r.get("energy") else ""
        print(f"bundle: {r['bundle']}" + (f" (LoRA rank {r['rank']}{energy})" if r.get("rank") else ""))


def federate(r: dict, args: Namespace) -> None:
    """A round table (accuracy of the global model, MB moved), then the privacy budget and the yardsticks."""
    if args.json:
        print(json.dumps(r, default=float))
        return
    if r.get("mode") == "client":
        print(f"client {r['client']} done: {r['rounds']} rounds on {r['examples']} examples, "
              f"{r['bytes_down'] / 1e6:.1f} MB received, {r['bytes_up'] / 1e6:.1f} MB sent, {r['wall_s']:.0f} s")
        return
    print(f"{'round':>5} {'accuracy':>9} {'MB':>8}")
    for row in r.get("rounds", []):
        acc = f"{row['accuracy']:.4f}" if row.get("accuracy") is not None else "-"
        print(f"{row['round']:>5} {acc:>9} {row.get('bytes', 0) / 1e6:>8.2f}")
    if r.get("epsilon") is not None:
        print(f"privacy: epsilon {r['epsilon']:.2f} at delta {r['delta']:g}")
    if r.get("alone_mean") is not None:
        print(f"each client alone (mean): {r['alone_mean']:.4f}")
    if r.get("bundle"):
        print(f"bundle: {r['bundle']}")


# ---- hub ------------------------------------------------------------------------------------------

def hub_added(entry: dict, args: Namespace) -> None:
    if args.json:
        print(json.dumps(entry, default=str))
        return
    print(f"added {entry['name']} to {entry['hub']}: {_hub_facts(entry)}, {_size(entry['size'])}")
    if entry.get("skipped"):
        print(f"({entry['skipped']} folder(s) in the hub are not bundles and were skipped; "
              f"`headstart hub reindex --hub {args.hub}` names them)")


def hub_entries(rows: list[dict], args: Namespace) -> None:
    if args.json:
        print(json.dumps(rows, default=str))
        return
    if not rows:
        print("no specialist matches" if args._command.name == "search" else "the hub is empty")
        return
    print(f"{'name':<24}{'task':<22}{'base':<20}{'method':<10}{'accuracy':>9}  labels")
    for r in rows:
        acc = r["metrics"].get("accuracy")
        labels = ", ".join(r["labels"][:6]) + (f" (+{len(r['labels']) - 6})" if len(r["labels"]) > 6 else "")
        print(f"{r['name']:<24}{r['task']:<22}{r['base']['name']:<20}{r['method']:<10}"
              f"{(f'{acc:.4f}' if isinstance(acc, (int, float)) else '-'):>9}  {labels}")


def hub_show(d: dict, args: Namespace) -> None:
    if args.json:
        print(json.dumps(d, default=str))
        return
    metrics = {k: v for k, v in d["metrics"].items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    print(f"name       {d['name']}\n{_hub_facts(d)}")
    print(f"base       {d['base']['name']} (sha256 {d['base']['sha256'][:16]}...)")
    if metrics:
        print("metrics    " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    print(f"created    {d.get('created')} with headstart {d.get('headstart_version')}\npath       {d['path']}")
    print("files")
    for rel, f in d["files"].items():
        print(f"  {f['sha256'][:16]}  {_size(f['size']):>9}  {rel}")
    if d.get("card"):
        print("\n" + d["card"].rstrip())


def hub_pulled(path, args: Namespace) -> None:
    if args.json:
        print(json.dumps({"path": str(path)}))
    else:
        print(f"pulled {args.name} to {path} (every file's sha256 verified)")


def hub_removed(entry: dict, args: Namespace) -> None:
    if args.json:
        print(json.dumps(entry, default=str))
    else:
        print(f"removed {entry['name']} from {args.hub}")


def hub_pushed(url: str, args: Namespace) -> None:
    if args.json:
        print(json.dumps({"url": url}))
    else:
        print(f"pushed {args.name} to {url}")


def hub_reindexed(index: dict, args: Namespace) -> None:
    if args.json:
        print(json.dumps(index, default=str))
        return
    print(f"indexed {len(index['entries'])} specialist(s) in {args.hub}")
    for s in index["skipped"]:
        print(f"skipped {s['folder']}: {s['why']}")


def _hub_facts(e: dict) -> str:
    labels = f", labels {', '.join(e['labels'])}" if e.get("labels") else ""
    return f"{e['task']} ({e['kind']}), base {e['base']['name']}, method {e['method']}{labels}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
