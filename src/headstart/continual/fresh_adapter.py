"""A fresh LoRA adapter per night, folded into the previous one afterwards.

Instead of training the current version's adapter further, the night trains a NEW adapter of the
method's rank beside it while the old one stays active and frozen: what earlier nights taught lives
in weights tonight's gradients cannot touch. After training the two are folded into ONE adapter
named "default" whose delta is exactly old + new (PEFT's `add_weighted_adapter(combination_type=
"cat")` stacks the A rows and the B columns, with each adapter's alpha/r scaling folded into its A
rows and the result's alpha = r, i.e. scaling 1). The bundle format does not change: the restore
path still loads one "default" adapter; only its rank grows by the method's r per night.

    name = add_fresh_adapter(model.backbone, rank=cfg.r, alpha=cfg.alpha)   # before training
    ... train (only adapter_trains(model.backbone, name) parameters get gradients) ...
    facts = fold_fresh_adapter(model.backbone)                              # after training
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..core.errors import TrainingError

OLD = "default"
"""The adapter a bundle stores and restores (PEFT's default name)."""
FRESH = "night"
"""Tonight's adapter, trained alone while OLD stays active and frozen."""
_FOLDED = "folded"  # the cat result before it takes OLD's name (PEFT has no rename)


def add_fresh_adapter(peft_model, rank: int | None = None, alpha: float | None = None) -> str:
    """Add tonight's adapter beside the current one: both active, only the fresh one trainable.

    `rank`/`alpha` are the method's own (LoraMethodConfig.r/.alpha): after earlier folds the stored
    adapter's config holds the grown rank with alpha = rank, which is not what a night should add.
    Left None they are read from the stored adapter (right for a version that was never folded).
    The fresh B starts at zero (PEFT's LoRA init), so the model's outputs are unchanged until it trains.
    """
    configs = getattr(peft_model, "peft_config", {})
    if FRESH in configs:
        raise TrainingError(f"a fresh adapter {FRESH!r} is already present (an earlier night was not folded)")
    if OLD not in configs:
        raise TrainingError(f"no {OLD!r} LoRA adapter to add a fresh one beside (is this a LoRA specialist?)")
    old = configs[OLD]
    _check_exact_fold(old)
    fresh = replace(old, r=int(rank or old.r), lora_alpha=alpha if alpha is not None else old.lora_alpha,
                    rank_pattern={}, alpha_pattern={}, inference_mode=False)
    peft_model.add_adapter(FRESH, fresh)
    _settle(peft_model)
    # BaseTuner.set_adapter takes a list (PeftModel.set_adapter only one name): both run in forward.
    peft_model.base_model.set_adapter([OLD, FRESH])
    for name, p in peft_model.named_parameters():
        if _adapter_of(name) is not None:
            p.requires_grad_(_adapter_of(name) == FRESH)
    return FRESH


def adapter_trains(peft_model, param_name: str) -> bool:
    """Whether a LoRA parameter trains: all of them normally, only the fresh adapter's while one is present."""
    if FRESH not in peft_model.peft_config:
        return True
    return _adapter_of(param_name) == FRESH


def has_fresh_adapter(peft_model) -> bool:
    return FRESH in getattr(peft_model, "peft_config", {})


def fold_fresh_adapter(peft_model) -> dict[str, Any]:
    """Replace the old and the fresh adapter by one "default" adapter whose delta is their exact sum.

    Returns facts for the manifest: {"rank_before", "rank_after", "fresh_rank"}.
    """
    configs = getattr(peft_model, "peft_config", {})
    if FRESH not in configs or OLD not in configs:
        raise TrainingError(f"nothing to fold: adapters present are {sorted(configs)}")
    rank_before, fresh_rank = int(configs[OLD].r), int(configs[FRESH].r)
    tuner = peft_model.base_model
    # cat: A = [s_old*A_old; s_new*A_new], B = [B_old, B_new], alpha = r (scaling 1)
    #   -> delta = B @ A = s_old * B_old @ A_old + s_new * B_new @ A_new, the exact sum.
    tuner.add_weighted_adapter([OLD, FRESH], [1.0, 1.0], _FOLDED, combination_type="cat")
    peft_model.set_adapter(_FOLDED)  # deleting an active adapter makes PEFT warn once per layer
    peft_model.delete_adapter(FRESH)
    peft_model.delete_adapter(OLD)
    # Copy into the stored name: one adapter + weight 1 is PEFT's linear path, which scales A and B by
    # sqrt(1 * scaling) = 1 here (the cat result has alpha = r), i.e. an exact copy.
    tuner.add_weighted_adapter([_FOLDED], [1.0], OLD, combination_type="linear")
    peft_model.set_adapter(OLD)  # also PeftModel.active_adapter, read by save_pretrained and forward
    peft_model.delete_adapter(_FOLDED)
    configs[OLD].inference_mode = False
    _settle(peft_model)
    return {"rank_before": rank_before, "rank_after": int(configs[OLD].r), "fresh_rank": fresh_rank}


def _check_exact_fold(config) -> None:
    # cat sets alpha = r (scaling 1); under rsLoRA scaling is alpha/sqrt(r) and DoRA's magnitude is not
    # additive, so the fold would not equal the sum. Headstart adapters use neither (bundle vetting refuses them).
    if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False):
        raise TrainingError("a fresh adapter per night needs a plain LoRA adapter (no rsLoRA, no DoRA)")


def _adapter_of(param_name: str) -> str | None:
    """'...lora_A.night.weight' -> 'night'; None for a parameter that is not a LoRA adapter's."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _settle(peft_model) -> None:
    """New adapter modules join the model as it is: its train/eval mode and its memory format."""
    from ..methods.lora.method import _match_memory_format  # image bases run channels_last

    # PEFT builds each new adapter's nn.Dropout in training mode even inside an eval() model: without
    # this, "eval" outputs after adding or folding would be randomly dropped out. Only the dropouts:
    # a blanket train()/eval() would undo modes the method set on purpose (frozen BatchNorm).
    for module in peft_model.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout.train(peft_model.training)
    _match_memory_format(peft_model)
