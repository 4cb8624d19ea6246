"""The diagonal of the (true) Fisher information, for EWC.

True Fisher, not the empirical one: for each example a label is SAMPLED from the model's own predictive
distribution and the gradient of that example's NLL is squared, F = E_x E_{y~p(y|x)} [g(x, y)^2].
Per-example gradients are squared before averaging; squaring the batch gradient (a shortcut some
libraries take) measures how well the batch's gradients agree, not how much each weight matters.

    nll = classifier_sampled_nll(model, train.items, load)
    fisher = fisher_diagonal(dict(model.head.named_parameters()), nll, n=len(train), max_examples=200, seed=0,
                             model=model)
    online = accumulate_fisher(previous, fisher, decay=0.9)   # online EWC (Schwarz et al. 2018)

`head_fisher` is the closed form for a linear head on cached features (no autograd, all examples at once).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SampledNll = Callable[[int, torch.Generator], torch.Tensor]
"""(example index, generator) -> the NLL of a label sampled with that generator from the model's prediction."""


def _sample_labels(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row of `probs` ([b, C]), drawn on the CPU with `generator` (seeded draws everywhere)."""
    return torch.multinomial(probs.detach().float().cpu(), 1, generator=generator).squeeze(1)


def _sample_order(n: int, max_examples: int | None, seed: int) -> tuple[list[int], torch.Generator]:
    """The seeded examples a Fisher estimate uses, and the generator that then samples their labels."""
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).tolist()
    return order[:n if max_examples is None else min(n, max_examples)], generator


def fisher_diagonal(params: dict[str, nn.Parameter], sampled_nll: SampledNll, n: int, max_examples: int | None = 200,
                    seed: int = 0, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """{name: mean over a seeded sample of min(n, max_examples) examples of (d nll_i / d param)^2}.

    `sampled_nll(i, generator)` returns example i's NLL for a label sampled from the model.
    Gradients are taken with `torch.autograd.grad` for `params` only, so no `.grad` is written.
    With `model`, it runs in eval mode (no dropout) with every other parameter frozen, and its
    train/eval mode and requires_grad flags are restored afterwards.
    """
    if n < 1:
        raise ValueError("fisher_diagonal needs at least one example")
    names = list(params)
    tensors = [params[k] for k in names]
    flags = {id(p): p.requires_grad for p in tensors}
    was_training = model.training if model is not None else None
    if model is not None:
        flags.update({id(p): p.requires_grad for p in model.parameters()})
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    for p in tensors:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    order, generator = _sample_order(n, max_examples, seed)
    try:
        for i in order:
            nll = sampled_nll(i, generator)
            grads = torch.autograd.grad(nll, tensors, allow_unused=True)
            for total, g in zip(sums, grads):
                if g is not None:
                    total.add_(g.detach().float().square())
    finally:
        every = list(model.parameters()) if model is not None else []
        for p in every + tensors:
            p.requires_grad_(flags[id(p)])
        if model is not None:
            model.train(was_training)
    return {k: s / len(order) for k, s in zip(names, sums)}


def classifier_sampled_nll(model: nn.Module, items: Sequence, load: Callable) -> SampledNll:
    """The `sampled_nll` of a classifier (`SpecialistModel`: `collate(examples, train)` then
    `model(**batch)` -> logits [1, C]): cross-entropy against a label drawn from softmax(logits)."""

    def nll(i: int, generator: torch.Generator) -> torch.Tensor:
        device = next(model.parameters()).device
        batch = model.collate([load(items[i])], False)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).float()
        label = _sample_labels(logits.softmax(-1), generator).to(device)
        return F.cross_entropy(logits, label, reduction="sum")

    return nll


def lm_sampled_nll(model: nn.Module, rows: Sequence[dict]) -> SampledNll:
    """The `sampled_nll` of a causal LM on tokenized chat rows ({"input_ids", "labels"} from
    `llm.tokenize.encode_chat`, labels -100 off the answer): at every answer position a token is sampled
    from the model's prediction there (the context stays the real, teacher-forced tokens), and the NLL is
    the sum over answer positions of -log p(sampled token)."""
    from ..llm.tokenize import IGNORE

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT injects LoRA in place

    def answer_logits(input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if hasattr(lm, "model") and hasattr(lm, "lm_head"):  # the LM head on answer positions only
            hidden = lm.model(input_ids=input_ids, use_cache=False).last_hidden_state
            return lm.lm_head(hidden[:, :-1][keep])
        return lm(input_ids=input_ids).logits[:, :-1][keep]

    def nll(i: int, generator: torch.Generator) -> torch.Tensor:
        device = next(lm.parameters()).device
        input_ids = torch.as_tensor(rows[i]["input_ids"], dtype=torch.long, device=device)[None]
        labels = torch.as_tensor(rows[i].get("labels", rows[i]["input_ids"]), dtype=torch.long, device=device)[None]
        keep = labels[:, 1:] != IGNORE  # logits at position t predict token t + 1
        if not bool(keep.any()):
            return torch.zeros((), device=device, requires_grad=True)
        log_probs = F.log_softmax(answer_logits(input_ids, keep).float(), dim=-1)  # [answer tokens, vocab]
        sampled = _sample_labels(log_probs.exp(), generator).to(device)
        return -log_probs.gather(1, sampled[:, None]).sum()

    return nll


@torch.no_grad()
def head_fisher(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                max_examples: int | None = None, seed: int = 0, expected: bool = True,
                prefix: str = "") -> dict[str, torch.Tensor]:
    """The diagonal Fisher of a linear head `logits = features @ weight.T + bias` in closed form.

    Example i's gradient of CE with label y is (p_i - e_y) x_i^T for the weight and (p_i - e_y) for the bias.
    `expected=True` takes the expectation over y ~ p_i exactly: E[(p_c - [y=c])^2] = p_c (1 - p_c), so
    F_W = mean_i p_i(1-p_i) x_i^2 -- the true Fisher with no sampling noise. `expected=False` samples one
    label per example exactly as `fisher_diagonal` does (same seed: the same examples and labels).
    Returns {"weight": [C, D], "bias": [C]} (no "bias" without one), keys as `{prefix}.weight` with a prefix
    (`prefix="head"` matches `model.head.named_parameters(prefix="head")`).
    """
    x = features.detach().float().to(weight.device)
    order, generator = _sample_order(x.shape[0], max_examples, seed)
    x = x[torch.as_tensor(order, dtype=torch.long, device=x.device)]
    logits = x @ weight.detach().float().T
    if bias is not None:
        logits = logits + bias.detach().float()
    probs = logits.softmax(-1)  # [m, C]
    if expected:
        coef = probs * (1 - probs)
    else:  # one draw per example, in fisher_diagonal's order, so both consume the generator alike
        labels = torch.cat([_sample_labels(probs[j:j + 1], generator) for j in range(len(order))])
        coef = (probs - F.one_hot(labels.to(probs.device), probs.shape[1]).float()).square()
    key = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)  # noqa: E731
    out = {key("weight"): coef.T @ x.square() / len(order)}
    if bias is not None:
        out[key("bias")] = coef.mean(0)
    return out


def accumulate_fisher(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor],
                      decay: float) -> dict[str, torch.Tensor]:
    """Online EWC: decay * old + new, per param of `new` (a param gone this version is dropped).
    A param whose first dimension grew (new classes) has its old Fisher padded with zeros: the new rows
    were not there to matter.

    >>> accumulate_fisher({"b": torch.ones(2)}, {"b": torch.ones(3)}, decay=0.5)["b"]
    tensor([1.5000, 1.5000, 1.0000])
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    out = {}
    for key, fresh in new.items():
        prev = (old or {}).get(key)
        if prev is None:
            out[key] = fresh.clone()
            continue
        prev = prev.to(fresh.device, fresh.dtype)
        if prev.shape != fresh.shape:
            if prev.dim() != fresh.dim() or prev.shape[1:] != fresh.shape[1:] or prev.shape[0] > fresh.shape[0]:
                raise ValueError(f"{key}: old Fisher {tuple(prev.shape)} does not fit the new {tuple(fresh.shape)}")
            prev = torch.cat([prev, prev.new_zeros((fresh.shape[0] - prev.shape[0], *fresh.shape[1:]))])
        out[key] = decay * prev + fresh
    return out
