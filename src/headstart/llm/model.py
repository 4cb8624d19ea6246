"""The causal LM to instruction-tune: fp32, or NF4 4-bit (QLoRA) on the CPU, plus LoRA.

`load_lm(base, quantize="nf4")` quantises the in-memory float32 model module by module with
bitsandbytes (every `nn.Linear` except `lm_head` -> `bnb.nn.Linear4bit`, NF4, double quant), so
it works for bases built from a config (tiny-llm) as well as for folder-backed ones (smollm2).

A trap this module guards against (measured with bitsandbytes 0.50.2 on an AVX512-BF16 CPU):
the first eval-mode forward without grad (any `generate()`) repacks each 4-bit weight into a
CPU inference layout, and that layout has no autograd kernel. Later training steps then run,
warn once, and silently lose the gradient through every base layer: only the LoRA layers that
write straight into the residual stream (o_proj, down_proj) still get a gradient, all others
get zeros. `guard_bnb_cpu` turns the repacking off (and undoes it where it already happened).

>>> lm, tokenizer, info = load_lm("tiny-llm", quantize="nf4")
>>> model = add_lora(lm, r=8)   # a PeftModel; only the LoRA weights train
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

QUANTIZE_CHOICES = (None, "nf4")


class _DropKernelsHint(logging.Filter):
    """bitsandbytes' CPU backend warns at import that the optional `kernels` package is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels" not in record.getMessage()


def _bnb() -> Any:
    """`import bitsandbytes`, without its harmless warning about the optional `kernels` package."""
    if "bitsandbytes" not in sys.modules:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsHint())
    import bitsandbytes

    return bitsandbytes


def _peft() -> Any:
    _bnb()  # peft imports bitsandbytes when it is installed: filter its warning first
    import peft

    return peft


def bf16_enabled(value: str | bool, strict: bool = False) -> bool:
    """The `bf16` option (auto / true / false) on this machine: `auto` follows what the CPU supports;
    `strict` (training) refuses `true` where the CPU has no bfloat16 arithmetic."""
    value, supported = str(value).lower(), cpu_supports_bf16()
    if strict and value == "true" and not supported:
        from ..core.errors import ConfigError

        raise ConfigError("bf16=true, but this CPU has no bfloat16 support (AVX512-BF16 / AMX); use bf16=auto")
    return supported if value == "auto" else value == "true"


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (avx512_bf16 or amx_bf16; Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def base_folder(backbone: Any) -> Path | None:
    """The local transformers folder the base's weights come from, or None (built from a config).

    For `smollm2-135m` this is the dequantised float32 cache folder (see `gguf_cache.dequantised_dir`),
    never the GGUF file itself.
    """
    lm = getattr(backbone, "lm", backbone)
    name = getattr(lm, "name_or_path", "") or getattr(getattr(lm, "config", None), "_name_or_path", "") or ""
    if not name:
        return None
    folder = Path(name)
    if folder.is_dir() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    return None


def is_4bit(model: nn.Module) -> bool:
    """Whether any layer of `model` (a plain or Peft model) holds bitsandbytes 4-bit weights."""
    if "bitsandbytes" not in sys.modules:
        return False
    bnb = _bnb()
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def load_lm(base: Any, quantize: str | None = None) -> tuple[nn.Module, Any, Any]:
    """(causal LM, tokenizer, BaseInfo) for a registered base name, a path, or a CausalLMBackbone.

    `quantize=None`: the float32 LM itself (`backbone.lm`, not a copy).
    `quantize="nf4"`: the same weights with every `nn.Linear` except `lm_head` replaced by a
    bitsandbytes `Linear4bit` (NF4, double quant, compute dtype bfloat16 when the CPU has native
    bf16 else float32), guarded with `guard_bnb_cpu`. Embeddings, norms and `lm_head` stay float32.
    A backbone passed in keeps its float32 LM (the quantised model is a separate copy); a base
    loaded here by name is quantised in place.
    """
    from ..bases.causal_lm import CausalLMBackbone

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    owned = not isinstance(base, CausalLMBackbone)
    if owned:
        from ..bases import load_base

        backbone = load_base(str(base))
        if not isinstance(backbone, CausalLMBackbone):
            raise ValueError(f"base {base!r} is a {backbone.info.kind} base; instruction tuning needs a causal LM")
    else:
        backbone = base
    lm = backbone.lm
    if getattr(lm, "hf_quantizer", None) is not None:
        raise ValueError(
            f"the LM of {backbone.info.name!r} carries a transformers quantizer ({type(lm.hf_quantizer).__name__}), "
            "which refuses training: load it from its dequantised float32 folder instead"
        )
    if quantize is None:
        return lm, backbone.tokenizer, backbone.info
    if not owned:
        lm = _copy_sharing_linear_weights(lm)
    compute_dtype = torch.bfloat16 if cpu_supports_bf16() else torch.float32
    quantize_linears_nf4(lm, compute_dtype=compute_dtype)
    return lm, backbone.tokenizer, backbone.info


def _copy_sharing_linear_weights(lm: nn.Module) -> nn.Module:
    # The Linear weights are about to be replaced by 4-bit copies: sharing them (instead of
    # deep-copying) avoids a transient second float32 copy of most of the model.
    skip = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    memo: dict[int, Any] = {}
    for m in lm.modules():
        if type(m) is nn.Linear and m is not skip:
            memo[id(m.weight)] = m.weight
    return copy.deepcopy(lm, memo)


def quantize_linears_nf4(lm: nn.Module, *, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace every `nn.Linear` except the output layer by an NF4 `Linear4bit`, in place; returns the count."""
    bnb = _bnb()
    skip = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    count = 0
    for parent in list(lm.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is skip:
                continue
            new = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta",
            )
            weight = child.weight.detach().to(torch.float32)
            new.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                quant_storage=torch.uint8, module=new,
            ).to("cpu")  # .to(device) on an unquantised Params4bit quantises it
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.detach().to(torch.float32).clone(), requires_grad=False)
            new.train(child.training)
            setattr(parent, name, new)
            count += 1
    lm.is_loaded_in_4bit = True  # peft then wraps these layers with its bnb-aware LoRA layers
    guard_bnb_cpu(lm)
    return count


def guard_bnb_cpu(model: nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights into its backward-less CPU inference layout.

    Sets `support_avx512bf16_for_cpu = False` on every `Linear4bit` (bitsandbytes 0.50.2 reads it
    in `Linear4bit.forward`), and converts back any weight that an earlier eval forward already
    repacked. Returns the number of layers guarded. Inference then dequantises per forward (a
    little slower on AVX512-BF16 CPUs) but every training step keeps its full backward.
    """
    if "bitsandbytes" not in sys.modules:  # then no module can be a Linear4bit
        return 0
    bnb = _bnb()
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    count = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        m.support_avx512bf16_for_cpu = False
        state = getattr(m.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            data, state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
            m.weight.data = data
            m.weight.quant_state = state
            m.quant_state = state
        count += 1
    return count


@contextlib.contextmanager
def bnb_cpu_inference(model: nn.Module) -> Iterator[int]:
    """Within the block, let bitsandbytes use its fast AVX512-BF16 inference layout; exact restore after.

    Measured on smollm2-135m NF4, one thread: greedy generation at 23 tok/s with the packed
    layout vs 12 tok/s through the guarded (dequantise-per-forward) path. The layout has no
    backward, so on exit every layer gets back the very tensors and quantisation state it had
    (not bitsandbytes' lossy inverse conversion) and is guarded again. Yields the number of
    layers allowed to repack (0 where the CPU lacks AVX512-BF16 or there are no 4-bit layers);
    layers the layout cannot hold (out_features not a multiple of 32, in_features not a multiple
    of the quantisation block size) stay guarded. Where the CPU lacks AVX512-BF16, the layers run on
    float copies made once for the block instead (`_dequantised_once`).
    """
    if "bitsandbytes" not in sys.modules:
        yield 0
        return
    bnb = _bnb()
    from bitsandbytes.functional import has_avx512bf16

    guard_bnb_cpu(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    saved = []
    if layers and not has_avx512bf16():
        with _dequantised_once(layers):
            yield 0
        return
    if layers and has_avx512bf16():
        for m in layers:
            state = m.weight.quant_state
            if state is None or m.weight.device.type != "cpu" or len(state.shape) != 2:
                continue
            if state.shape[0] % 32 or state.shape[1] % state.blocksize:  # what the packed layout can hold
                continue
            saved.append((m, m.weight.data, state))
            m.weight.quant_state = m.quant_state = copy.deepcopy(state)  # the repacking mutates it
            m.support_avx512bf16_for_cpu = True
    try:
        yield len(saved)
    finally:
        for m, data, state in saved:
            m.support_avx512bf16_for_cpu = False
            m.weight.data = data
            m.weight.quant_state = m.quant_state = state


@contextlib.contextmanager
def _dequantised_once(layers: list) -> Iterator[None]:
    """Within the block, each 4-bit layer runs on a float copy of its weight made once on entry.

    Without AVX512-BF16 bitsandbytes de-quantises every layer on every forward: for generation that is the
    whole model once per token (smollm2-135m NF4 generated at a fraction of the float32 model's speed). One
    de-quantisation per answer costs what one token did, and the copies (the size of the float32 weights,
    what LoRA holds all the time) are freed on exit. Training never enters here: it keeps the 4-bit path.
    """
    bnb = _bnb()
    for m in layers:
        state = m.weight.quant_state
        dense = bnb.functional.dequantize_4bit(m.weight.data, state).to(torch.float32)
        m.forward = functools.partial(_dense_forward, dense, m.bias)  # an instance attribute shadows the class's
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def _dense_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return out.to(x.dtype)


def add_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | str = "all-linear",
) -> Any:
    """Wrap `model` in a PEFT LoRA model for CAUSAL_LM; the base is frozen, only LoRA weights train.

    A 4-bit model goes through `peft.prepare_model_for_kbit_training` first (base frozen, any
    fp16/bf16 non-4-bit weight cast to fp32, 4-bit weights left packed) and is guarded again.
    `"all-linear"` targets every linear layer except the output layer.
    """
    peft = _peft()
    quantized = is_4bit(model)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if quantized:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        peft_model = peft.get_peft_model(model, config)
    if quantized:
        guard_bnb_cpu(peft_model)
    return peft_model


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    out = []
    for attr in ("absmax", "code", "offset"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return out


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored; shared tensors count once.

    4-bit weights count as their packed uint8 data plus their quantisation state (absmax,
    double-quant statistics, code book).
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key in seen:
            return
        seen.add(key)
        total += key[1]

    for p in model.parameters():
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in _quant_state_tensors(state):
                add(t)
    for b in model.buffers():
        add(b)
    return total
