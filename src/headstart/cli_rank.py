"""`headstart rank`: which base (and layer) will transfer best, in seconds, without fine-tuning."""
from __future__ import annotations

import json
import sys


def add_commands(sub, make_sub) -> None:
    s = make_sub(sub, "rank", cmd_rank)
    s.add_argument("data", help="labelled image folder or text table(s), as for `fit`")
    s.add_argument("--bases", default=None,
                   help="comma list of bases (default: efficientnet-lite0,1,2 for images; minilm-l6,smollm2-135m for text)")
    s.add_argument("--layers", default="final",
                   help="final (the features `fit` uses), all (every layer each base offers), or a comma list")
    s.add_argument("--by", default="logme", choices=["logme", "nce", "leep", "hscore", "knn"],
                   help="the score that orders the ranking")
    s.add_argument("--split", default="train", help="the labelled split to score on")
    s.add_argument("--max-examples", type=int, default=4000,
                   help="score at most this many rows (a seeded, class-stratified sample)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true",
                   help='print {"candidates": [{"base", "layer", "logme", ...}, ...]} (best first) on the last line')


def cmd_rank(args) -> int:
    """Rank candidate bases (and their layers) for a dataset by LogME, NCE, LEEP, H-score and kNN.

    Features come from the feature cache: ranking N bases costs N feature extractions, and a later
    `fit --method probe` on the winner extracts nothing.

    Examples:
      headstart rank ../shared/data/flowers17 --bases efficientnet-lite0,efficientnet-lite1,efficientnet-lite2 --json
      headstart rank ../shared/data/trec --bases minilm-l6,smollm2-135m --layers all
    """
    from .transfer.rank import rank

    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    ranking = rank(args.data, bases=args.bases, layers=args.layers, by=args.by, split=args.split,
                   max_examples=args.max_examples, seed=args.seed, log=log)
    log(ranking.table())
    best = ranking.best()
    log(f"best by {ranking.by}: {best.base} (layer {best.layer}); ranked {len(ranking.candidates)} candidate(s) "
        f"in {ranking.wall_s:.1f} s")
    if args.json:
        print(json.dumps(ranking.to_json(), default=float))
    return 0
