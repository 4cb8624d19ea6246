"""The DPO objective (Rafailov et al. 2023, "Direct Preference Optimization") as pure tensor functions.

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))))

with sequence log-probabilities summed over the answer tokens only (labels != IGNORE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...llm.tokenize import IGNORE


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits and [B, T] unshifted labels (IGNORE = not scored) -> [B] summed log-probabilities.

    Position t's logits predict token t + 1 (`logits[:, :-1]` against `labels[:, 1:]`), as in the
    model's own loss. Computed in float32, one row at a time, so bf16 logits lose nothing and
    the [T, V] log-softmax of only one row is ever held.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"need logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    targets = labels[:, 1:]
    mask = targets != IGNORE
    safe = targets.masked_fill(~mask, 0).unsqueeze(-1)
    out = []
    for b in range(logits.shape[0]):
        row = logits[b, :-1].float()
        token_logps = row.gather(-1, safe[b]).squeeze(-1) - torch.logsumexp(row, dim=-1)
        out.append((token_logps * mask[b]).sum())
    return torch.stack(out) if out else logits.new_zeros(0, dtype=torch.float32)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean DPO loss, stats) from [B] sequence log-probabilities of the policy and the frozen reference.

    stats: reward_chosen / reward_rejected (mean implicit rewards beta * (policy - reference)),
    reward_accuracy (share of pairs whose chosen reward beats the rejected one) and margin
    (mean reward_chosen - reward_rejected). The reference terms are treated as constants.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    logits = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        chosen_reward = beta * (policy_chosen.detach() - ref_chosen)
        rejected_reward = beta * (policy_rejected.detach() - ref_rejected)
        stats = {
            "reward_chosen": chosen_reward.float().mean().item(),
            "reward_rejected": rejected_reward.float().mean().item(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
            "margin": (chosen_reward - rejected_reward).float().mean().item(),
        }
    return loss, stats
