"""Vetting a PEFT adapter folder before PEFT reads it.

PEFT trusts its folder: it falls back to `adapter_model.bin` (torch.load, a pickle) or to the hub
when `adapter_model.safetensors` is missing, and its `adapter_config.json` switches on machinery
headstart never uses (`megatron_core` names a module PEFT imports; `alora_invocation_tokens`,
`use_dora`, `layer_replication`, `loftq_config` change what runs). So a bundle's adapter folder
must hold exactly a LoRA config and safetensors weights, and the config may vary only in the
fields headstart's own adapters vary in; every other field keeps PEFT's default.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import BundleError
from .format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, not_safetensors, one_line

TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS")


def _number(low: float, high: float, integer: bool = False):
    def ok(v: Any) -> bool:
        kinds = (int,) if integer else (int, float)
        return isinstance(v, kinds) and not isinstance(v, bool) and low <= v <= high
    return ok


def _optional_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _targets(v: Any) -> bool:
    return (isinstance(v, str) and bool(v)) or (isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v))


def _per_module(check):
    """A {module name: value} map (merged adapters carry a rank per module: `rank_pattern`, `alpha_pattern`)."""
    def ok(v: Any) -> bool:
        return isinstance(v, dict) and all(isinstance(k, str) and k and check(x) for k, x in v.items())
    return ok


def _auto_mapping(v: Any) -> bool:  # read only by AutoPeftModel, never by PeftModel.from_pretrained
    return v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))


FREE_FIELDS = {
    "peft_type": lambda v: v == "LORA",
    "r": _number(1, 65536, integer=True),
    "lora_alpha": _number(1e-6, 1e6),
    "lora_dropout": _number(0.0, 0.999),
    "target_modules": _targets,
    "task_type": lambda v: v in TASK_TYPES,
    "inference_mode": lambda v: isinstance(v, bool),
    "base_model_name_or_path": _optional_str,
    "revision": _optional_str,
    "peft_version": _optional_str,
    "auto_mapping": _auto_mapping,
    "rank_pattern": _per_module(_number(1, 65536, integer=True)),
    "alpha_pattern": _per_module(_number(1e-6, 1e6)),
}
"""Fields a headstart LoRA adapter sets, each with what it may hold."""


def check_adapter_folder(folder: Path) -> Path:
    """Refuse anything in a PEFT adapter folder but a plain LoRA config and safetensors weights."""
    if not folder.is_dir():
        raise BundleError(f"{folder.parent}: incomplete bundle (no adapter folder {folder.name}/)")
    others = sorted(p.name for p in folder.iterdir()
                    if p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"))
    if others:
        raise BundleError(f"{folder}: unexpected file(s) in the adapter folder ({', '.join(others[:4])}); "
                          f"adapters load only from {ADAPTER_WEIGHTS}")
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{folder}: incomplete adapter (no {ADAPTER_CONFIG})") from None
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise BundleError(f"{path}: unreadable adapter config ({one_line(e)})") from None
    check_lora_config(config, path)
    check_safetensors_file(folder / ADAPTER_WEIGHTS, "adapter weights")
    return folder


def check_lora_config(config: Any, where: Path) -> None:
    """The config sets only the fields headstart sets; the rest are absent, off, or PEFT's defaults."""
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise BundleError(f"{where}: not a LoRA adapter config")
    defaults = _lora_defaults()
    for key, value in config.items():
        if key in FREE_FIELDS:
            if not FREE_FIELDS[key](value):
                raise BundleError(f"{where}: adapter config field {key!r} has an unusable value ({_short(value)})")
        elif key in defaults:
            if value != defaults[key]:
                raise BundleError(f"{where}: adapter config sets {key!r} ({_short(value)}), which headstart "
                                  "adapters never use; refused")
        elif value not in (None, False, {}, []):  # a field from a newer PEFT may be present, switched off
            raise BundleError(f"{where}: unknown adapter config field {_short(key)}; refused")


def check_safetensors_file(path: Path, what: str) -> None:
    """Read every tensor of a safetensors file, so a damaged one fails here and not inside PEFT."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BundleError(f"{path.parent}: incomplete adapter (no {path.name})")
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise not_safetensors(path, what, e) from None


def _lora_defaults() -> dict[str, Any]:
    """PEFT's LoraConfig defaults as they appear in JSON (fields whose default is not JSON are left out)."""
    import dataclasses

    from peft import LoraConfig

    out = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        try:
            out[f.name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue  # e.g. runtime_config: never written to adapter_config.json
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
