from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...data import Dataset
from ...core.errors import ConfigError
from ..base import FitContext, FitResult, Method, SpecialistModel
from ..labels import code_like, fill_templates, label_phrases, parse_answer_words, parse_label_text
from ..prototype.method import cosine_model, cosine_state, set_cosine_head
from .config import ZeroShotConfig

DEFAULT_TEMPLATES = {"text": ["{}"], "causal_lm": ["{}"], "image": ["a photo of a {}."]}
DEFAULT_SCALE = 20.0


class ZeroShot(Method):
    """No examples: inputs matched to label names/descriptions (embedding similarity or causal-LM likelihood)."""

    config: ZeroShotConfig
    needs_examples = False

    @property
    def frozen_base(self) -> bool:  # type: ignore[override]
        return self.config.scoring == "similarity"

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        cfg = self.config
        t0 = time.perf_counter()
        descriptions = parse_label_text(cfg.label_text, data.classes)
        words = parse_answer_words(cfg.answer_word, data.classes)
        scoring = self.scoring_for(backbone.kind)
        texts = {**words, **descriptions}  # what stands for a label: its description, else its answer word
        coded = code_like(data.classes, texts)
        if coded:  # a causal LM answers with the label's word whatever its description says: a word replaces it
            hint = (f"give each a plain answer word, e.g. --answer-word \"{coded[0]}=<a word the LM knows>\", or a "
                    f"description, --label-text \"{coded[0]}=<what a {coded[0]} text is>\"" if scoring == "likelihood"
                    else f"describe each, e.g. --label-text \"{coded[0]}=<what a {coded[0]} text is>\"")
            ctx.log(f"zero-shot: label(s) {', '.join(coded)} look like codes or jargon that a base cannot read from "
                    f"the name; {hint}")
        if scoring == "likelihood" and backbone.kind != "causal_lm":
            raise ConfigError(f"scoring='likelihood' needs a causal LM base (e.g. smollm2-135m); "
                              f"{backbone.info.name} is a {backbone.kind} base")
        # The manifest records what was actually used, so the bundle rebuilds without the original files.
        # A copy: this method object and its config are never changed by a fit.
        used = dataclasses.replace(cfg, scoring=scoring, label_text=[f"{k}={v}" for k, v in descriptions.items()],
                                   answer_word=[f"{k}={v}" for k, v in words.items()])
        if scoring == "likelihood":
            model, details = self._fit_likelihood(backbone, data.classes, descriptions, words, used)
        else:  # labels with neither are matched by their name
            model, details = self._fit_similarity(backbone, data.classes, texts, used)
        details["label_text"] = descriptions
        details["answer_word"] = words
        resolved = copy.copy(self)
        resolved.config = used  # the bundle's method: its frozen_base and bundle rules follow the scoring used
        return FitResult(model=model, train_s=time.perf_counter() - t0, details=details, method=resolved,
                         config=used)

    def scoring_for(self, kind: str) -> str:
        """The scoring used on a base of this kind: `auto` is likelihood for causal LMs, else similarity."""
        if self.config.scoring != "auto":
            return self.config.scoring
        return "likelihood" if kind == "causal_lm" else "similarity"

    # ---- embedding similarity (text encoders, image-text bases, causal-LM features) -----------
    def _fit_similarity(self, backbone, classes: list[str], descriptions: dict[str, str], cfg: ZeroShotConfig):
        if not backbone.has_text_tower:
            raise ConfigError(f"{backbone.info.name} is an image base without a text tower: zero-shot images need "
                              "a CLIP/SigLIP-style base (a local folder or hub id); with a few labelled photos "
                              "use --method prototype or probe")
        templates = cfg.templates or DEFAULT_TEMPLATES[backbone.kind]
        phrases = label_phrases(classes, descriptions)
        vectors = []
        for phrase in phrases:  # CLIP's prompt ensembling: mean of the unit embeddings of every template
            emb = backbone.encode_text(fill_templates(phrase, templates), cfg.batch_size)
            vectors.append(F.normalize(emb.float(), dim=-1).mean(0))
        scale = cfg.scale or _base_scale(backbone) or DEFAULT_SCALE
        model = cosine_model(backbone, len(classes))
        set_cosine_head(model, torch.stack(vectors), scale)
        return model, {"scoring": "similarity", "templates": templates, "label_phrases": phrases, "scale": scale}

    # ---- causal-LM likelihood -----------------------------------------------------------------
    def _fit_likelihood(self, backbone, classes: list[str], descriptions: dict[str, str], words: dict[str, str],
                        cfg: ZeroShotConfig):
        from ..lm_scoring import LabelScoringModel, default_prompt_spec

        spec = default_prompt_spec(classes, descriptions, [], cfg.instruction, cfg.calibrate, answer_words=words)
        model = LabelScoringModel(backbone, spec, length_norm=cfg.length_norm)
        model.calibrate_()
        return model, {"scoring": "likelihood", "calibration": model.calibration.tolist()}

    # ---- bundle: a likelihood model stores what `incontext` stores (see lm_scoring) ----------
    def trained_state(self, model) -> dict[str, torch.Tensor]:
        from ..lm_scoring import LabelScoringModel, scoring_state

        return scoring_state(model) if isinstance(model, LabelScoringModel) else cosine_state(model)

    def save_artifacts(self, model, folder: Path, base_name: str) -> None:
        from ..lm_scoring import LabelScoringModel, save_prompt

        if isinstance(model, LabelScoringModel):
            save_prompt(model, folder)

    def restore(self, backbone, num_classes: int, state: dict[str, torch.Tensor], folder: Path) -> SpecialistModel:
        if self.scoring_for(backbone.kind) == "likelihood":
            from ..lm_scoring import load_scoring_model

            return load_scoring_model(backbone, state, folder, self.config.batch_size)
        from ...engine.checkpoint import copy_state_into

        model = cosine_model(backbone, num_classes)
        copy_state_into(model, state)
        return model


def _base_scale(backbone) -> float | None:
    """An image-text base's own learned logit scale (CLIP: ~100), so probabilities match the model's."""
    scale = getattr(backbone, "logit_scale", None)
    return float(scale()) if callable(scale) else None
