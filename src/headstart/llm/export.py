"""Export a LoRA-tuned causal LM as one plain transformers folder (LoRA merged into fp32 weights).

Merging into 4-bit weights would re-quantise them (lossy), so a QLoRA adapter is first put back
on the float32 base it was trained against (`adapter_on_fp32_base`), then merged:

>>> fp32_lm, tokenizer, _ = load_lm("smollm2-135m")
>>> merged = merge_adapter_into_base(adapter_on_fp32_base(bundle / "adapter", fp32_lm))
>>> save_merged(merged, tokenizer, Path("out/my-model"))
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.storage import atomic_dir
from .model import _peft, is_4bit


def _refuse_4bit(model: nn.Module, what: str) -> None:
    if is_4bit(model):
        raise ValueError(
            f"{what}: the base model holds 4-bit (bitsandbytes) weights, and merging LoRA into them "
            "would re-quantise the result (lossy). Save the adapter, rebuild it on the float32 base "
            "with adapter_on_fp32_base(adapter_folder, fp32_lm), and merge that instead."
        )


def merge_adapter_into_base(peft_model: Any) -> nn.Module:
    """A plain float32 transformers model with the LoRA weights merged in (`merge_and_unload`).

    Works in place: the PeftModel's base model (often a backbone's `lm`) receives the merged
    weights and the LoRA layers are removed; use the returned model afterwards.
    Raises ValueError for a 4-bit base and TypeError for anything but a PeftModel.
    """
    peft = _peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    _refuse_4bit(peft_model, "merge_adapter_into_base")
    merged = peft_model.merge_and_unload()
    merged = merged.to(torch.float32)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(merged):
            delattr(merged, attr)
    return merged.eval()


def adapter_on_fp32_base(adapter_folder: Path, base_lm: nn.Module) -> Any:
    """The adapter saved in `adapter_folder` (LoRA or QLoRA run) on the float32 `base_lm`.

    `base_lm` gets the LoRA layers injected in place (PEFT's `from_pretrained`); pass a copy to
    keep it untouched. A QLoRA adapter loads unchanged: the module names are the same and the
    LoRA weights themselves were trained in float32.
    """
    peft = _peft()
    _refuse_4bit(base_lm, "adapter_on_fp32_base")
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.PeftModel.from_pretrained(base_lm, str(adapter_folder), is_trainable=False)


def save_merged(model: nn.Module, tokenizer: Any, out: Path) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `out`, atomically; returns `out`.

    The folder is written under a temporary sibling name and renamed into place, so `out` is
    either the previous folder or the complete new one. It loads offline with
    `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`.
    """
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        raise TypeError("save_merged takes a merged model: call merge_adapter_into_base(peft_model) first")
    _refuse_4bit(model, "save_merged")
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
