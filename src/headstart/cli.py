"""The `headstart` command: each subcommand maps its flags onto one API function.

Method options become flags from the method's config dataclass (`--lr`, `--unfreeze`, `--r` ...),
with the field docstrings as help text, so the CLI never drifts from the Python API.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, get_type_hints

from .core.errors import HeadstartError

COMMON_METHOD_FLAGS = {"epochs": int, "batch_size": int}
"""`fit` always accepts these; a method without such a field (probe has no epochs) notes that it ignores them."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except HeadstartError as e:
        print(f"headstart: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("finished runs are in its shots.json" if getattr(args, "command", "") == "shots"
                else "rerun the same command with --resume to continue")
        print(f"\nheadstart: interrupted; {hint}", file=sys.stderr)
        return 130


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="headstart", description="Turn a pretrained base into a specialist for one job: "
                                "fit, evaluate, predict, inspect bundles.")
    p.add_argument("--version", action="version", version=f"headstart {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = _sub(sub, "bases", cmd_bases)
    s.add_argument("--json", action="store_true", help="print a JSON list")

    s = _sub(sub, "methods", cmd_methods)

    s = _sub(sub, "fit", cmd_fit)
    s.add_argument("data", help="image folder (<split>/<class>/* or <class>/*) or text table(s): CSV/TSV/JSONL")
    s.add_argument("--base", default=None, help="registered base, local model folder, timm name or hub id, or auto "
                   "(rank the built-in bases by LogME and use the best; default: efficientnet-lite0 for images, "
                   "minilm-l6 for text)")
    s.add_argument("--method", default="probe", help="auto, zeroshot, prototype, probe, setfit, incontext, finetune, "
                   "lora, scratch (see `headstart methods`)")
    s.add_argument("--out", default=None, help="bundle folder to write")
    s.add_argument("--shots", type=int, default=None, help="keep K training examples per class")
    _add_training_flags(s)
    s.add_argument("--json", action="store_true", help="print the final metrics as JSON on the last stdout line")
    s.add_argument("--task", default="classify", choices=["classify", "sft", "dpo"],
                   help="classify (default), or tune a causal LM as a generator: sft (instruction data), "
                   "dpo (preference pairs; --base may be an SFT bundle)")
    s.add_argument("--eval", default=None, help="sft/dpo: held-out file for eval loss (default: 10%% of the data)")
    _add_method_flags(s, _peek(argv, "--method", "probe"), task=_peek(argv, "--task", "classify"))

    s = _sub(sub, "shots", cmd_shots)
    s.add_argument("data", help="image folder or text table(s), as for `fit`")
    s.add_argument("--base", default=None, help="registered base, local model folder, timm name or hub id "
                   "(default: efficientnet-lite0 for images, minilm-l6 for text)")
    s.add_argument("--methods", default=None,
                   help="comma list (default: zeroshot,prototype,probe,setfit,lora, those registered)")
    s.add_argument("--shots", default="0,2,4,8,16,32,64", help="comma list of examples per class")
    s.add_argument("--seeds", default="5", help="N (seeds 0..N-1) or a comma list of seeds")
    s.add_argument("--out", default=None, help="folder for shots.json, shots.md and shots.png")
    s.add_argument("--save-bundles", action="store_true", help="keep every run's bundle in OUT/bundles/")
    s.add_argument("--image-size", type=int, default=None, help="image bases: train and predict at this resolution")
    s.add_argument("--text-column", default="text")
    s.add_argument("--label-column", default="label")
    s.add_argument("--json", action="store_true", help='print {"results": [...]} as JSON on the last stdout line')

    s = _sub(sub, "adapt", cmd_adapt)
    s.add_argument("--source", required=True, help="labelled source data (image folder or text table), as for `fit`")
    s.add_argument("--target", required=True, help="target-domain data; its labels, if any, are hidden from the method")
    s.add_argument("--target-unlabelled", action="store_true",
                   help="the target may have no labels (a table without a label column, a folder of loose images)")
    s.add_argument("--target-test", default=None,
                   help="labelled target data to measure on (default: the target's own held-out split)")
    s.add_argument("--base", default=None, help="as for `fit`")
    s.add_argument("--method", default="selftrain", help="selftrain, coral, dann, adabn or source-only")
    s.add_argument("--oracle", default="auto", choices=["auto", "true", "false"],
                   help="train the target-oracle reference on the labelled target (auto: when it has labels)")
    s.add_argument("--out", default=None, help="bundle folder for the adapted specialist")
    _add_training_flags(s)
    s.add_argument("--json", action="store_true", help="print the report as JSON on the last stdout line")
    _add_method_flags(s, _peek(argv, "--method", "selftrain"))

    s = _sub(sub, "corrupt", cmd_corrupt)
    s.add_argument("source", help="image folder (any layout; mirrored under --out)")
    s.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    s.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius in pixels")
    s.add_argument("--dark", type=float, default=0.0, help="darkening in [0, 1): intensities x (1 - dark)")
    s.add_argument("--noise", type=float, default=0.0, help="std of Gaussian pixel noise on the [0, 1] scale")
    s.add_argument("--jpeg", type=int, default=None, help="re-encode as JPEG at this quality (1-95)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--keep-placeholders", action="store_true",
                   help="corrupt images with very few colours too (digits, line art) instead of skipping them")

    from . import cli_llm, cli_rank

    cli_llm.add_commands(sub, _sub)
    cli_rank.add_commands(sub, _sub)

    s = _sub(sub, "evaluate", cmd_evaluate)
    s.add_argument("bundle")
    s.add_argument("data")
    s.add_argument("--split", default=None, help="split to evaluate (default: test, else val)")
    s.add_argument("--json", action="store_true")

    s = _sub(sub, "predict", cmd_predict)
    s.add_argument("bundle")
    s.add_argument("inputs", nargs="+", help="image files (image specialists) or texts (text specialists)")
    s.add_argument("--top-k", type=int, default=1)
    s.add_argument("--json", action="store_true")

    s = _sub(sub, "info", cmd_info)
    s.add_argument("bundle")
    s.add_argument("--json", action="store_true")
    return p


def _add_training_flags(s: argparse.ArgumentParser) -> None:
    """The run flags `fit` and `adapt` share."""
    s.add_argument("--seed", type=int, default=0, help="seed for sampling, splits, initialisation and order")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    s.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    s.add_argument("--image-size", type=int, default=None,
                   help="train and predict image bases at this resolution (default: the base's own, e.g. 224)")
    s.add_argument("--keep-placeholders", action="store_true",
                   help="keep images with very few colours (line art, icons) instead of skipping them as placeholders")
    s.add_argument("--text-column", default="text")
    s.add_argument("--label-column", default="label")


def _sub(sub, name: str, fn) -> argparse.ArgumentParser:
    doc = inspect.getdoc(fn) or ""
    s = sub.add_parser(name, help=doc.split("\n")[0], description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.set_defaults(run=fn)
    return s


# ---- commands ---------------------------------------------------------------------------------

def cmd_bases(args) -> int:
    """List the known bases: name, kind, parameters, source (loads each once to count its weights)."""
    from .bases import list_bases, load_base

    rows = []
    for spec in list_bases():
        try:
            info = load_base(spec.name).info
            rows.append({"name": spec.name, "kind": spec.kind, "params": info.params, "source": spec.source,
                         "sha256": info.sha256, "available": True})
        except HeadstartError as e:
            rows.append({"name": spec.name, "kind": spec.kind, "params": None, "source": spec.source,
                         "available": False, "why": str(e)})
        if not args.json:
            r = rows[-1]
            params = f"{r['params'] / 1e6:.1f}M" if r["params"] else "-"
            note = "" if r["available"] else f"  (unavailable: {r['why']})"
            print(f"{r['name']:<20}{r['kind']:<11}{params:>8}  {r['source']}{note}", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_methods(args) -> int:
    """List the methods and their options."""
    from .methods import list_methods

    for spec in list_methods():
        print(f"{spec.name:<14}{spec.summary}")
        docs = field_docs(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            print(f"    --{f.name.replace('_', '-'):<20}{docs.get(f.name, '')}")
    return 0


def cmd_fit(args) -> int:
    """Specialise a base on labelled data and write a bundle.

    Examples:
      headstart fit ../shared/data/hymenoptera --base efficientnet-lite0 --method lora --out runs/ants-lora
      headstart fit ../shared/data/trec --base minilm-l6 --method probe --shots 8 --seed 1 --out runs/trec-8
    """
    from .api import fit

    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    options = {k: getattr(args, "opt_" + k) for k in args.method_fields if getattr(args, "opt_" + k) is not None}
    for k in COMMON_METHOD_FLAGS:
        if k not in args.method_fields and getattr(args, "opt_" + k, None) is not None:
            log(f"note: method {args.method!r} has no {k} option; --{k.replace('_', '-')} ignored")
    if args.task != "classify":
        from .cli_llm import fit_generative

        return fit_generative(args, options, log)
    spec = fit(args.data, base=args.base, method=args.method, shots=args.shots, seed=args.seed, out=args.out,
               resume=args.resume, use_cache=not args.no_cache, text_column=args.text_column,
               label_column=args.label_column, image_size=args.image_size,
               skip_placeholders=not args.keep_placeholders, log=log, **options)
    if args.json and spec.is_main_process:  # under `accelerate launch`, one JSON line, from the main process
        from .core.report import headline

        print(json.dumps(headline(spec.manifest["metrics"])))
    return 0


def cmd_shots(args) -> int:
    """Accuracy vs shots: every method x shot count x seed on the same sampled subsets.

    Examples:
      headstart shots ../shared/data/trec --base minilm-l6 --methods zeroshot,probe,lora --shots 0,2,8,32 --seeds 3
      headstart shots ../shared/data/hymenoptera --methods probe,finetune --out runs/ants-shots --json
    """
    from .experiments.shots import DEFAULT_METHODS, format_shots_table, run_shots

    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    methods = _comma_list("--methods", args.methods, str) if args.methods is not None else DEFAULT_METHODS
    seeds: int | list[int] = _comma_list("--seeds", args.seeds, int)
    if "," not in args.seeds:
        seeds = seeds[0]
    result = run_shots(args.data, base=args.base, methods=methods, shots=_comma_list("--shots", args.shots, int),
                       seeds=seeds, out=args.out, save_bundles=args.save_bundles, text_column=args.text_column,
                       label_column=args.label_column, image_size=args.image_size, log=log)
    log("\n" + format_shots_table(result))
    if args.out:
        log(f"wrote {Path(args.out) / 'shots.json'}, shots.md, shots.png")
    if not result["results"]:
        raise HeadstartError("no run succeeded; see the errors above")
    if args.json:
        print(json.dumps({"results": result["results"]}))
    return 0


def _comma_list(flag: str, text: str, typ: type) -> list:
    from .core.errors import ConfigError

    parts = [p.strip() for p in text.split(",")]
    try:
        values = [typ(p) for p in parts]
        if not parts or "" in parts:
            raise ValueError
    except ValueError:
        what = "whole numbers" if typ is int else "names"
        raise ConfigError(f"{flag} {text!r}: expected a comma list of {what}, e.g. "
                          f"{'0,2,8' if typ is int else 'probe,lora'}") from None
    return values


def cmd_adapt(args) -> int:
    """Adapt to a target domain from unlabelled target data; report source-only, adapted and oracle accuracy.

    Examples:
      headstart adapt --source books_train.csv --target kitchen_train.csv --target-unlabelled \\
                      --base minilm-l6 --method selftrain --out runs/books2kitchen
      headstart corrupt ../shared/data/hymenoptera --blur 2 --dark 0.4 --noise 0.05 --out /tmp/ants-factory
      headstart adapt --source ../shared/data/hymenoptera --target /tmp/ants-factory --method adabn
    """
    from .experiments.adapt import adapt

    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    options = {k: getattr(args, "opt_" + k) for k in args.method_fields if getattr(args, "opt_" + k) is not None}
    run = adapt(args.source, args.target, base=args.base, method=args.method, target_test=args.target_test,
                target_unlabelled=args.target_unlabelled, oracle={"auto": None, "true": True, "false": False}[args.oracle],
                seed=args.seed, out=args.out, resume=args.resume, use_cache=not args.no_cache,
                text_column=args.text_column, label_column=args.label_column, image_size=args.image_size,
                skip_placeholders=not args.keep_placeholders, log=log, **options)
    if args.json:
        print(json.dumps({k: v for k, v in run.report.items() if k != "target_metrics"}, default=float))
    return 0


def cmd_corrupt(args) -> int:
    """Make a reproducible "clean -> blurry, dark, noisy" copy of an image folder (a domain shift to adapt to).

    Example:
      headstart corrupt ../shared/data/hymenoptera --blur 2 --dark 0.4 --noise 0.05 --seed 0 --out /tmp/ants-factory
    """
    from .data.corrupt import corrupt_folder
    from .core.errors import ConfigError

    try:
        corrupt_folder(args.source, args.out, blur=args.blur, dark=args.dark, noise=args.noise, jpeg=args.jpeg,
                       seed=args.seed, overwrite=args.overwrite, skip_placeholders=not args.keep_placeholders)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


def cmd_evaluate(args) -> int:
    """Evaluate a bundle on a dataset split: accuracy, macro-F1, per-class F1."""
    from .api import load

    m = load(args.bundle).evaluate(args.data, args.split, progress=not args.json)
    if args.json:
        print(json.dumps(m))
    elif "perplexity" in m:  # a generative (sft/dpo) bundle
        print(f"{args.bundle} on {args.data} ({m['examples']} examples, {m['response_tokens']} answer tokens)")
        print(f"loss        {m['loss']:.4f}\nperplexity  {m['perplexity']:.2f}")
    else:
        print(f"{args.bundle} on {args.data} ({m['split']}, {m['examples']} examples)")
        print(f"accuracy  {m['accuracy']:.4f}\nmacro-F1  {m['macro_f1']:.4f}")
        for c, f1 in m["per_class_f1"].items():
            print(f"  {c:<20}F1 {f1:.4f}")
    return 0


def cmd_predict(args) -> int:
    """Predict labels for image files or texts."""
    from .api import load

    spec = load(args.bundle)
    probs = spec.predict_proba(args.inputs)
    k = max(1, min(args.top_k, len(spec.classes)))
    rows = []
    for x, p in zip(args.inputs, probs):
        top = p.topk(k)
        rows.append({"input": x, "label": spec.classes[top.indices[0]], "score": round(float(top.values[0]), 4),
                     "top": [{"label": spec.classes[i], "score": round(float(s), 4)}
                             for s, i in zip(top.values.tolist(), top.indices.tolist())]})
    if args.json:
        print(json.dumps({"predictions": rows}))
    else:
        for r in rows:
            alts = "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"][1:])
            print(f"{r['label']}\t{r['score']:.3f}\t{r['input']}" + (f"\t({alts})" if alts else ""))
    return 0


def cmd_info(args) -> int:
    """Show what a bundle holds: base, method and config, labels, metrics, files."""
    from .bundle import read_manifest

    m = read_manifest(args.bundle)
    if args.json:
        print(json.dumps(m))
        return 0
    met = m.get("metrics", {})
    print(f"bundle     {args.bundle}")
    print(f"base       {m['base']['name']} ({m['base']['kind']}, {m['base']['params'] / 1e6:.1f}M params, "
          f"sha256 {m['base']['sha256'][:16]}...)")
    print(f"method     {m['method']['name']} {json.dumps(m['method']['config'])}")
    print(f"labels     {', '.join(m['classes'])}")
    if met:
        print(f"metrics    accuracy {met.get('accuracy', 0):.4f}, macro-F1 {met.get('macro_f1', 0):.4f} "
              f"({met.get('split')}), trainable {met.get('trainable_params', 0):,} params, {met.get('wall_s', 0):.1f} s")
    files = sorted(str(p.relative_to(args.bundle)) for p in Path(args.bundle).rglob("*") if p.is_file())
    print(f"files      {', '.join(files)}")
    print(f"created    {m.get('created')} with headstart {m.get('versions', {}).get('headstart')}")
    return 0


# ---- method flags from config dataclasses -----------------------------------------------------

def _add_method_flags(s: argparse.ArgumentParser, method: str, task: str = "classify") -> None:
    from .llm.config import TASKS
    from .methods.registry import get_method_spec

    try:
        cls = TASKS[task] if task in TASKS else get_method_spec(method).config_cls
    except HeadstartError:
        cls = None  # `fit` itself reports the unknown method
    group = s.add_argument_group(f"{task if task in TASKS else method} options")
    fields = [f.name for f in dataclasses.fields(cls)] if cls else []
    for name, typ in COMMON_METHOD_FLAGS.items():
        if name not in fields:
            s.add_argument(f"--{name.replace('_', '-')}", dest="opt_" + name, type=typ, default=None,
                           help="(not used by this method)")
    if cls is None:
        s.set_defaults(method_fields=[])
        return
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        names.append(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        repeatable = "list[str]" in str(hints[f.name])  # --label-text A=.. --label-text B=..
        group.add_argument(f"--{f.name.replace('_', '-')}", dest="opt_" + f.name, default=None,
                           action="append" if repeatable else "store",
                           type=str if repeatable else _parser_type(hints[f.name]), metavar=f.name.upper(),
                           help=f"{docs.get(f.name, '')} (default: {'auto' if default is None else default})"
                           .replace("%", "%%"))  # argparse %-formats help text
    s.set_defaults(method_fields=names)


def _parser_type(hint: Any):
    text = str(hint)
    if "list[float]" in text:
        return lambda v: [float(x) for x in v.split(",")]
    if "bool" in text:
        return lambda v: v.lower() in ("1", "true", "yes", "on")
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _peek(argv: list[str], flag: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


if __name__ == "__main__":
    sys.exit(main())
