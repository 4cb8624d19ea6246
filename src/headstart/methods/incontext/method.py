from __future__ import annotations

import dataclasses
import time

from ...data import Dataset
from ...data.sampling import per_class_sample
from ...core.errors import ConfigError
from ..base import FitContext, FitResult, Method
from ..labels import parse_answer_words, parse_label_text
from ..lm_scoring import LabelScoringModel, LMScoringMixin, default_prompt_spec
from .config import InContextConfig


class InContext(LMScoringMixin, Method):
    """Causal LM with K labelled examples per class in the prompt; labels scored by log-likelihood.

    Nothing is trained: the bundle holds the prompt (prompt.json) and the calibration vector.

    >>> spec = headstart.fit("../shared/data/trec", base="smollm2-135m", method="incontext", examples_per_class=2)
    """

    config: InContextConfig

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        if backbone.kind != "causal_lm":
            raise ConfigError(f"incontext needs a causal LM base such as smollm2-135m; "
                              f"{backbone.info.name!r} is a {backbone.kind} base")
        cfg = self.config
        t0 = time.perf_counter()
        descriptions = parse_label_text(cfg.label_text, data.classes)
        words = parse_answer_words(cfg.answer_word, data.classes)
        # The manifest records the resolved entries (self-contained); a copy, so `self.config` is unchanged.
        used = dataclasses.replace(cfg, label_text=[f"{k}={v}" for k, v in descriptions.items()],
                                   answer_word=[f"{k}={v}" for k, v in words.items()])
        train = data.split("train")
        chosen = sample_examples(train.labels, len(data.classes), cfg.examples_per_class, ctx.seed)
        examples = [(train.items[i], train.labels[i]) for i in chosen]
        spec = default_prompt_spec(data.classes, descriptions, examples, cfg.instruction, cfg.calibrate, ctx.seed,
                                   words)
        model = LabelScoringModel(backbone, spec, length_norm=cfg.length_norm, batch_size=cfg.batch_size)
        model.calibrate_()
        model.eval()
        counts = {c: sum(1 for _, y in examples if y == i) for i, c in enumerate(data.classes)}
        return FitResult(model=model, train_s=time.perf_counter() - t0, config=used,
                         details={"examples_used": len(examples), "examples_per_class": counts,
                                  "prompt_tokens": model.prompt_tokens,
                                  "calibration": dict(zip(data.classes, model.calibration.tolist()))})

    def restore(self, backbone, num_classes: int, state, folder) -> LabelScoringModel:
        model = self.restore_scoring(backbone, state, folder)
        if len(model.spec.classes) != num_classes:
            raise ConfigError(f"{folder}: prompt.json has {len(model.spec.classes)} labels, the manifest {num_classes}")
        return model


def sample_examples(labels: list[int], num_classes: int, per_class: int, seed: int) -> list[int]:
    """Indices of up to `per_class` demonstrations of each class: `Dataset.with_shots`'s sampling."""
    return per_class_sample(labels, num_classes, per_class, seed)
