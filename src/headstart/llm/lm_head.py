"""Log-probabilities of target tokens through the LM head, in chunks: the [tokens, vocab] logits never exist whole.

SmolLM2's head has 49,152 columns: the logits of 8 x 150 answer tokens are 236 MB in float32, and autograd
keeps the log-softmax (another 236 MB) plus a bf16 copy until the backward. Here each chunk of rows is
projected, turned into log-probabilities of its targets, and dropped. The gradient needs nothing else:
log p(y_n | h_n) depends on row n of the hidden states only, so d logp_n / d h_n = (onehot(y_n) - p_n) W
is a [tokens, hidden] matrix computed per chunk in the forward, and the backward scales its rows by the
incoming per-token gradients -- right for any per-token weighting (a mean for SFT, per-sequence sums for
DPO), with no recomputation. The head's weight gets no gradient (it is frozen in LoRA / QLoRA); a head
that trains goes through the plain path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ROWS = 512
"""Rows per chunk: 512 x 49,152 float32 logits are 100 MB, and the matmul is still large enough to be fast."""


def target_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] float32 log p(targets[n] | hidden[n]) through `head` (an nn.Linear without bias, e.g. lm_head).

    Under autocast the projection runs in the autocast dtype and the softmax in float32, as autocast
    would run `head(hidden).float()`.
    """
    weight = getattr(head, "weight", None)
    if type(head) is not nn.Linear or head.bias is not None or weight.requires_grad:
        logits = head(hidden).float()
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _ChunkedTargetLogps.apply(hidden, weight, targets, dtype)


class _ChunkedTargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        need_grad = ctx.needs_input_grad[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            for start in range(0, hidden.shape[0], CHUNK_ROWS):
                rows = slice(start, start + CHUNK_ROWS)
                logits = F.linear(hidden[rows].to(dtype), w).float()
                log_probs = torch.log_softmax(logits, dim=-1)
                del logits
                logps[rows] = log_probs.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
                if need_grad:  # d logp / d logits = onehot - softmax, then through the head
                    d_logits = log_probs.exp_().neg_()
                    d_logits.scatter_add_(-1, targets[rows].unsqueeze(-1),
                                          torch.ones_like(targets[rows], dtype=d_logits.dtype).unsqueeze(-1))
                    grad_hidden[rows] = (d_logits.to(dtype) @ w).to(hidden.dtype)
                del log_probs
        ctx.save_for_backward(grad_hidden if need_grad else None)
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_logps.unsqueeze(-1).to(grad_hidden.dtype), None, None, None
