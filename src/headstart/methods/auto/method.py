from __future__ import annotations

from collections import Counter

from ...data import Dataset
from ..base import FitContext, FitResult, Method
from ..registry import make_method
from .config import AutoConfig

# Thresholds come from bench/shots.py (accuracy vs examples per class, README "Few-shot"): the
# crossovers measured there on SST-5, Emotion, TREC (minilm-l6) and hymenoptera, flowers17
# (efficientnet-lite0).
RULES = {
    "text": [(0, "zeroshot"), (64, "setfit"), (None, "lora")],
    "causal_lm": [(0, "zeroshot"), (None, "probe")],
    "image": [(0, "zeroshot"), (4, "prototype"), (None, "probe")],
}
FAST_FALLBACK = {"setfit": "probe", "lora": "probe"}
WHY = {
    "zeroshot": "no labelled examples: label names/descriptions are all there is",
    "prototype": "too few examples per class to fit a head: class means of frozen features were more accurate "
                 "than a probe up to 4 per class (hymenoptera, flowers17)",
    "probe": "a linear head on frozen features: the most accurate frozen-base method from a few examples up, "
             "and seconds to fit",
    "setfit": "contrastive tuning of the sentence encoder on pairs of the examples, then a head: the most "
              "accurate text method measured from 2 to 64 examples per class",
    "lora": "plenty of examples per class: adapting the base (LoRA) beats a frozen-feature head",
}


def choose_method(examples_per_class: int, kind: str, allow_slow: bool = True) -> tuple[str, str]:
    """(method name, reason) for a dataset with `examples_per_class` (its smallest class) on a base kind.

    >>> choose_method(8, "text")[0]
    'setfit'
    """
    for limit, name in RULES.get(kind, RULES["text"]):
        if limit is None or examples_per_class <= limit:
            break
    if not allow_slow and name in FAST_FALLBACK:
        name = FAST_FALLBACK[name]
    return name, f"{examples_per_class} examples per class on a {kind} base -> {name}: {WHY[name]}"


class Auto(Method):
    """Chooses zeroshot / prototype / probe / setfit / lora from the examples per class and base kind."""

    config: AutoConfig
    needs_examples = False

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        labels = data.split("train").labels
        counts = Counter(labels)
        smallest = min(counts.get(c, 0) for c in range(len(data.classes))) if labels else 0
        name, why = choose_method(smallest, backbone.kind, self.config.allow_slow)
        ctx.log(f"auto: {why}")
        chosen = make_method(name)
        result = chosen.fit(backbone, data, ctx)
        result.method = result.method or chosen  # a method may hand back the copy it actually used
        result.details = {**result.details, "auto": {"chose": name, "why": why, "examples_per_class": smallest}}
        return result
