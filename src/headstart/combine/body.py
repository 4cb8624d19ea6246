"""A base whose weights a merge can set to base + task vector and read features through.

Candidates of a merge (every method and scale `auto` tries, every step of a greedy soup) are scored by
writing W0 + delta into one loaded base, in place, and extracting features: no PEFT model is built per
candidate, and the result equals the LoRA adapter it will be stored as (an exact-rank LoRA is the same
delta). Only the chosen merge is written as a bundle.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.errors import BundleError
from ..data import loader_for
from ..engine.features import encode


class DeltaBody:
    """One loaded base + the pretrained values of the parameters merges change."""

    def __init__(self, backbone):
        self.backbone = backbone.eval()
        self.params = dict(backbone.named_parameters())
        self.buffers = dict(backbone.named_buffers())
        self._pretrained: dict[str, torch.Tensor] = {}
        self._pretrained_buffers = {k: v.detach().clone() for k, v in self.buffers.items() if v.is_floating_point()}
        self.load = loader_for(backbone.kind)

    def state(self) -> dict[str, torch.Tensor]:
        return {**{k: p.detach() for k, p in self.params.items()}, **self.buffers}

    @torch.no_grad()
    def apply(self, deltas: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None = None) -> None:
        """Set every changed parameter to its pretrained value + `deltas[name]` (the rest: pretrained)."""
        for name in deltas:
            if name not in self.params:
                raise BundleError(f"a task vector changes {name!r}, which the base does not have")
            if name not in self._pretrained:
                self._pretrained[name] = self.params[name].detach().clone()
        for name, w0 in self._pretrained.items():
            delta = deltas.get(name)
            self.params[name].copy_(w0 if delta is None else w0 + delta.to(w0.dtype).reshape(w0.shape))
        for name, value in self._pretrained_buffers.items():
            self.buffers[name].copy_((buffers or {}).get(name, value))

    @torch.no_grad()
    def features(self, items: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Features [N, D] of `items` through the body as it is set now (no cache: the body changes)."""
        return encode(self.backbone, list(items), self.load, batch_size, progress=False)

    @torch.no_grad()
    def reestimate_batchnorm(self, items: Sequence[Any], batch_size: int = 32, limit: int = 512) -> dict[str, torch.Tensor]:
        """Recompute BatchNorm running statistics on `items` (a merged body's activations no longer match the
        ones its statistics were taken on); returns the new statistics by buffer name ({} without BN)."""
        bns = [m for m in self.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns or not items:
            return {}
        saved = [(m.momentum, m.training) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch, not an exponential one
            m.train()
        items = list(items)[:limit]
        for start in range(0, len(items), batch_size):
            chunk = [self.load(x) for x in items[start:start + batch_size]]
            self.backbone(**self.backbone.collate(chunk, False))
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        return {k: v.detach().clone() for k, v in self.buffers.items()
                if k.endswith(("running_mean", "running_var"))}
