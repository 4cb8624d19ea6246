"""The generative-LM commands: `fit --task sft|dpo`, `generate`, `export` (kept apart from cli.py's classifiers)."""
from __future__ import annotations

import json
import sys


def add_commands(sub, make_sub) -> None:
    s = make_sub(sub, "generate", cmd_generate)
    s.add_argument("bundle", help="an sft/dpo bundle")
    s.add_argument("prompt", nargs="+", help="the instruction (several words are joined)")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--repetition-penalty", type=float, default=1.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help='print {"answer": ...} instead of streaming')

    s = make_sub(sub, "export", cmd_export)
    s.add_argument("bundle", help="an sft/dpo bundle")
    s.add_argument("--merged", action="store_true", required=True,
                   help="merge the adapter into the full-precision base (the only export so far)")
    s.add_argument("--out", required=True, help="folder for the transformers model (config, safetensors, tokenizer)")


def fit_generative(args, options: dict, log) -> int:
    """`fit --task sft|dpo`: instruction or preference tuning of a causal LM."""
    from .api import fit

    spec = fit(args.data, base=args.base, method=args.method, task=args.task, eval=args.eval, seed=args.seed,
               out=args.out, resume=args.resume, progress=True, log=log, **options)
    metrics = spec.manifest["metrics"]
    if args.json:
        print(json.dumps(metrics, default=float))
    else:
        print(json.dumps(metrics, indent=2, default=float))
    return 0


def cmd_generate(args) -> int:
    """Answer a prompt with an sft/dpo bundle, streaming tokens as they are produced.

    Example:
      headstart generate runs/alpaca-lora "Give three tips for staying healthy."
    """
    from .api import load
    from .core.errors import BundleError

    spec = load(args.bundle)
    if not hasattr(spec, "generate"):
        raise BundleError(f"{args.bundle} is a classifier bundle; `generate` needs an sft/dpo bundle")
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    if args.json:
        print(json.dumps({"answer": spec.generate(" ".join(args.prompt), **options)}))
        return 0
    spec.generate(" ".join(args.prompt), stream=lambda piece: print(piece, end="", flush=True), **options)
    print()
    return 0


def cmd_export(args) -> int:
    """Export an sft/dpo bundle as a plain transformers model folder with the adapter merged in.

    Example:
      headstart export runs/alpaca-lora --merged --out merged-model/
    """
    from .api import load
    from .core.errors import BundleError

    spec = load(args.bundle)
    if not hasattr(spec, "export_merged"):
        raise BundleError(f"{args.bundle} is a classifier bundle; `export --merged` needs an sft/dpo bundle")
    out = spec.export_merged(args.out)
    print(f"wrote {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    return 0
