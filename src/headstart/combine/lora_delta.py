"""LoRA adapters <-> exact dense weight deltas.

A LoRA module adds ΔW = (B @ A) * scale to its base weight (scale = alpha / r, or alpha / sqrt(r) with
rsLoRA). Merging adapters must merge these deltas, not their factors: the mean of the B's times the mean of
the A's holds cross-terms B_i·A_j that no adapter learned. So `lora_deltas` turns an adapter into exact
dense deltas, the merge maths runs on those (`merge_math`), and `deltas_to_lora` factors the result back
into a PEFT adapter by SVD: exactly (rank = the delta's numerical rank) or truncated to a rank, reporting
the share of the delta's energy (squared singular values) kept.

Shapes, as PEFT stores them (peft/tuners/lora/layer.py):
  Linear       A (r, in)            B (out, r)          ΔW (out, in)   [(in, out) with fan_in_fan_out, Conv1D]
  Conv2d k x k A (r, in, kh, kw)    B (out, r, 1, 1)    ΔW (out, in, kh, kw)   (1x1 is the same with k = 1)
so ΔW = (B.flatten(1) @ A.flatten(1)).reshape(out, *A.shape[1:]) covers them all.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..core.errors import BundleError, ConfigError

if TYPE_CHECKING:  # torch / safetensors are imported inside the functions: `headstart.combine` stays cheap
    import torch

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_A, _B = ".lora_A.weight", ".lora_B.weight"

# Config fields whose adapters are not "base + (B @ A) * scale" per module: merging their B·A would be wrong.
_NOT_PLAIN_LORA = {
    "use_dora": "DoRA (its delta rescales the whole weight by a learned magnitude, it is not B·A)",
    "alora_invocation_tokens": "activated LoRA (it only applies after its invocation tokens)",
    "use_qalora": "QA-LoRA (its A acts on pooled input groups)",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "lora_bias": "LoRA with a trained bias", "layer_replication": "replicated layers",
    "target_parameters": "LoRA on raw parameters", "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens",
}
# Initialisations that change the BASE weights: the adapter alone is not the delta from the pretrained model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter as stored: `config` = adapter_config.json, `tensors` = adapter_model.safetensors."""

    config: dict[str, Any]
    tensors: dict[str, "torch.Tensor"] = field(repr=False)


def read_lora(folder: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (safetensors only; pickled `adapter_model.bin` is refused), refusing
    the variants whose delta is not (B @ A) * scale (DoRA, ...) by name.

    >>> adapter = read_lora("bundle/adapter")            # doctest: +SKIP
    >>> deltas = lora_deltas(adapter)                   # doctest: +SKIP
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise BundleError(f"{folder}: no {CONFIG_FILE}, not a PEFT adapter folder")
    if not weights_path.is_file():
        pickled = " (only a pickled adapter_model.bin, which headstart never loads)" if (
            folder / "adapter_model.bin").exists() else ""
        raise BundleError(f"{folder}: no {WEIGHTS_FILE}{pickled}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{config_path}: unreadable ({err})") from None
    _refuse_variants(config, folder)
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own types for damaged files
        raise BundleError(f"{weights_path}: unreadable ({err})") from None
    for key in tensors:
        if "lora_embedding_" in key:
            raise BundleError(f"{folder}: LoRA on an embedding layer ({key}) does not merge yet; "
                              "adapt linear or conv layers only")
        if not key.endswith((_A, _B)):
            raise BundleError(f"{folder}: stores {key!r}, which is not a LoRA A/B weight; only plain LoRA merges")
    return LoraAdapter(config=config, tensors=tensors)


def _refuse_variants(config: dict[str, Any], folder: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise BundleError(f"{folder}: a {peft_type} adapter, not LoRA; only LoRA adapters merge")
    for key, what in _NOT_PLAIN_LORA.items():
        if config.get(key):
            raise BundleError(f"{folder}: {what} is not plain LoRA ({key}); its delta is not B·A, so it does "
                              "not merge")
    if config.get("bias", "none") != "none":
        raise BundleError(f"{folder}: trains biases (bias={config['bias']!r}), which are not part of B·A")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise BundleError(f"{folder}: initialised with {init!r}, which changes the base weights; convert it to a "
                          "plain LoRA first (PEFT's path_initial_model_for_weight_conversion)")


def pattern_key(patterns: Iterable[str], module_path: str) -> str | None:
    """The first `rank_pattern` / `alpha_pattern` key matching `module_path`, as PEFT matches them: a regex
    that must match a whole dotted suffix of the module's name (peft.utils.other.get_pattern_key).

    >>> pattern_key(["q_proj", "layers\\\\.0\\\\..*"], "model.layers.3.q_proj")
    'q_proj'
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def module_scale(config: dict[str, Any], module_path: str, r: int) -> float:
    """The factor PEFT multiplies B @ A by in `module_path`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alphas = config.get("alpha_pattern") or {}
    key = pattern_key(alphas, module_path)
    alpha = float(alphas[key] if key is not None else config.get("lora_alpha", 8))
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def _module_path(key: str, suffix: str) -> str:
    path = key[: -len(suffix)]
    return path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path


def lora_deltas(adapter: LoraAdapter) -> dict[str, "torch.Tensor"]:
    """module_path -> the exact dense ΔW = (B @ A) * scale (float32), shaped like the base module's weight,
    so `module_path + ".weight"` is the base parameter it adds to."""
    config, tensors = adapter.config, adapter.tensors
    ranks = config.get("rank_pattern") or {}
    out = {}
    for key in sorted(k for k in tensors if k.endswith(_A)):
        path = _module_path(key, _A)
        b_key = key[: -len(_A)] + _B
        if b_key not in tensors:
            raise BundleError(f"adapter holds {key} without its {b_key}")
        a, b = tensors[key].float(), tensors[b_key].float()
        r = a.shape[0]
        wanted = ranks.get(pattern_key(ranks, path), config.get("r", r))
        if r != wanted or b.shape[1] != r:
            raise BundleError(f"{path}: LoRA factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not "
                              f"match rank {wanted} (a grouped conv, or a damaged adapter)")
        delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * module_scale(config, path, r)
        out[path] = delta.T.contiguous() if config.get("fan_in_fan_out") else delta
    if len(out) * 2 != len(tensors):
        raise BundleError("adapter holds lora_B weights without their lora_A")
    return out


def deltas_to_lora(deltas: dict[str, "torch.Tensor"], rank: int | None = None, *, fan_in_fan_out: bool = False
                   ) -> tuple[dict[str, "torch.Tensor"], dict[str, int], dict[str, float]]:
    """Factor each dense delta into PEFT LoRA tensors by SVD, with alpha == r (scale 1).

    `rank` None = exact: each delta's numerical rank (singular values above float32 noise), capped at
    min(out, in); an int = at most that rank (never more than the numerical rank). `fan_in_fan_out` = the
    deltas are shaped (in, out), as GPT-2's Conv1D weights (pass the adapter config's value).
    Returns (tensors with keys `base_model.model.<path>.lora_A.weight` / `.lora_B.weight`,
    rank_pattern {path: r}, energy {path: share of squared singular values kept, 1.0 when exact}).
    """
    import torch

    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"LoRA rank must be a positive integer (or None for exact), got {rank!r}")
    tensors, rank_pattern, energy = {}, {}, {}
    for path, delta in deltas.items():
        d = delta.detach().float()
        d = d.T if fan_in_fan_out else d
        matrix = d.reshape(d.shape[0], -1)  # (out, in * kh * kw)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        noise = s[0] * max(matrix.shape) * torch.finfo(torch.float32).eps if len(s) else 0.0
        numerical = int((s > noise).sum())
        keep = max(1, numerical if rank is None else min(rank, numerical))
        total = float((s.double() ** 2).sum())
        kept = float((s[:keep].double() ** 2).sum())
        energy[path] = 1.0 if keep >= numerical or total == 0.0 else kept / total
        root = s[:keep].sqrt()  # the singular values split evenly: A and B of like norms, as trained ones are
        a = (root[:, None] * vh[:keep]).reshape(keep, *d.shape[1:])
        b = (u[:, :keep] * root).reshape(d.shape[0], keep, *([1] * (d.dim() - 2)))
        tensors[PEFT_PREFIX + path + _A] = a.contiguous()
        tensors[PEFT_PREFIX + path + _B] = b.contiguous()
        rank_pattern[path] = keep
    return tensors, rank_pattern, energy


def write_lora(folder: str | Path, template_config: dict[str, Any], tensors: dict[str, "torch.Tensor"],
               rank_pattern: dict[str, int]) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) holding `tensors`.

    The config keeps the template's task_type, base_model_name_or_path and fan_in_fan_out; sets r and
    lora_alpha to the largest rank, and rank_pattern == alpha_pattern per module (scale 1, no rsLoRA, no
    DoRA). target_modules = exactly the modules in `rank_pattern`: the template's targets could miss a module
    another merged adapter adapted (PEFT would silently drop its tensors) or catch one with no delta.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    for path, r in rank_pattern.items():
        a = tensors.get(PEFT_PREFIX + path + _A)
        if a is None or PEFT_PREFIX + path + _B not in tensors or a.shape[0] != r:
            raise ConfigError(f"{path}: rank {r} in rank_pattern but no matching lora_A / lora_B tensors")
    if len(tensors) != 2 * len(rank_pattern):
        raise ConfigError("tensors hold modules missing from rank_pattern")
    # longest paths first: PEFT takes the first pattern that matches a dotted suffix, so a module whose name
    # ends with another module's whole path still gets its own entry
    paths = sorted(rank_pattern, key=lambda p: (-len(p), p))
    top = max(rank_pattern.values(), default=1)
    config = dict(template_config)
    for key in _NOT_PLAIN_LORA:
        config.pop(key, None)
    config.update(
        peft_type="LORA", r=top, lora_alpha=top, use_rslora=False, use_dora=False, bias="none",
        init_lora_weights=True, inference_mode=True, target_modules=sorted(rank_pattern), exclude_modules=None,
        layers_to_transform=None, layers_pattern=None,
        rank_pattern={p: rank_pattern[p] for p in paths}, alpha_pattern={p: rank_pattern[p] for p in paths},
    )
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
