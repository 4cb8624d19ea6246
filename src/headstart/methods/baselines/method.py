from __future__ import annotations

from ...data import Dataset
from ..adaptation import AdaptationMethod, labelled_target
from ..base import FitContext, FitResult


class SourceOnly(AdaptationMethod):
    """Baseline: train on the labelled source only (probe, lora or finetune by --backbone); the target is unused."""

    needs_target = False

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        method = self.resolved(backbone.kind)  # a copy: this method object is never changed by a fit
        result = method.trainer().fit(backbone, data, ctx)
        result.config = method.config  # the manifest records this method's config, not its trainer's
        return result


class TargetOracle(AdaptationMethod):
    """Upper reference: the same training on the *labelled* target (what adaptation tries to approach)."""

    uses_target_labels = True

    def fit(self, backbone, data: Dataset, ctx: FitContext) -> FitResult:
        method = self.resolved(backbone.kind)  # a copy: this method object is never changed by a fit
        result = method.trainer().fit(backbone, labelled_target(data, ctx.target), ctx)
        result.details["trained_on"] = "target"
        result.config = method.config
        return result
