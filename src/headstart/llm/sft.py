"""Instruction tuning (`--task sft`): LoRA on the fp32 base or QLoRA on a 4-bit NF4 base, on the CPU.

    spec = headstart.fit("../shared/data/alpaca_en_demo/train.jsonl", base="smollm2-135m", task="sft",
                         method="qlora", out="runs/alpaca-qlora")
    spec.manifest["metrics"]["eval_loss_before"], spec.manifest["metrics"]["eval_loss"]

Each example is rendered with the base's chat template; the loss covers the assistant's answers
(and their end-of-turn token) only. Held-out loss is measured before and after training on `eval`
(a file) or a seeded `eval_fraction` of the training file.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.storage import cache_dir
from ..engine.perf import peak_memory_mb
from ..core.errors import ConfigError, DataError
from .config import METHODS, SFTConfig
from .data import load_sft_examples, split_holdout
from ..bundle.generator import LMSpecialist, response_loss
from .tokenize import IGNORE, encode_chat, length_grouped_batches, pack_rows, pad_batch
from .train import answer_loss, epoch_batches, train_adapter


def prepare_model(base: str, method: str, cfg: SFTConfig, log: Callable[[str], None]):
    """(PEFT model with a fresh adapter, tokenizer, base info, bf16 flag) for `method` lora / qlora."""
    from .model import add_lora, cpu_supports_bf16, load_lm

    if method not in METHODS:
        raise ConfigError(f"task sft/dpo has methods {', '.join(METHODS)}, not {method!r}")
    model, tokenizer, info = load_lm(base, quantize="nf4" if method == "qlora" else None)
    bf16 = _bf16(cfg.bf16, cpu_supports_bf16())
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    peft_model = add_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.targets())
    peft_model.peft_config["default"].base_model_name_or_path = info.name
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log(f"{method} on {info.name}: {trainable:,} trainable adapter parameters, bf16 autocast {'on' if bf16 else 'off'}")
    return peft_model, tokenizer, info, bf16


def fit_sft(data: str | Path, base: str = "smollm2-135m", method: str = "lora", *, eval: str | Path | None = None,
            out: str | Path | None = None, seed: int = 0, resume: bool = False, progress: bool = True,
            log: Callable[[str], None] = print, **options: Any) -> LMSpecialist:
    """Instruction-tune `base` on `data` (JSONL: alpaca, chat messages or prompt/completion rows)."""
    t0 = time.perf_counter()
    cfg = _config(SFTConfig, options, seed)
    train, held, skipped = train_and_held(load_sft_examples, data, eval, cfg.eval_fraction, seed)
    model, tokenizer, info, bf16 = prepare_model(base, method, cfg, log)
    train_rows, cut = _encode(tokenizer, train, cfg.max_length)
    eval_rows, _ = _encode(tokenizer, held, cfg.max_length)
    if not train_rows:
        raise DataError(f"{data}: no training example keeps an answer within max_length={cfg.max_length}")
    if cfg.packing:
        train_rows = pack_rows(train_rows, cfg.max_length, tokenizer.eos_token_id)
    log(f"sft: {len(train_rows)} training {'blocks' if cfg.packing else 'examples'}, {len(eval_rows)} held out "
        f"({len(skipped)} rows skipped, {cut} without an answer within max_length)")
    pad_id = tokenizer.pad_token_id
    eval_before, _ = response_loss(model, eval_rows, pad_id, cfg.batch_size, bf16)
    log(f"held-out loss before: {eval_before:.4f}")

    def step_loss(batch_idx: list[int]):
        batch = pad_batch([train_rows[i] for i in batch_idx], pad_id)
        tokens = int(batch["attention_mask"].sum())
        return answer_loss(model, batch), {}, tokens

    lengths = [len(r["input_ids"]) for r in train_rows]
    batches = epoch_batches(lambda e: length_grouped_batches(lengths, cfg.batch_size, seed * 1000 + e), cfg.epochs)
    fingerprint = {"task": "sft", "base": info.sha256, "method": method, "config": cfg.to_json(), "seed": seed,
                   "data": _file_key(data), "eval": _file_key(eval) if eval else None}
    ckpt = _checkpoint_dir(out, fingerprint)
    run = train_adapter(model, batches=batches, step_loss=step_loss, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup_ratio=cfg.warmup_ratio, bf16=bf16, checkpoint_every=cfg.checkpoint_every,
                        checkpoint_dir=ckpt, resume=resume, fingerprint=fingerprint, progress=progress, log=log)
    eval_after, eval_tokens = response_loss(model, eval_rows, pad_id, cfg.batch_size, bf16)
    log(f"held-out loss after: {eval_after:.4f} (before {eval_before:.4f})")
    from .model import weight_memory_bytes

    metrics = {"eval_loss_before": eval_before, "eval_loss": eval_after,
               "eval_perplexity_before": _ppl(eval_before), "eval_perplexity": _ppl(eval_after),
               "train_examples": len(train), "eval_examples": len(eval_rows), "eval_tokens": eval_tokens,
               "tokens": run["tokens"], "tokens_per_s": round(run["tokens_per_s"], 1), "train_s": round(run["train_s"], 1),
               "base_weight_mb": round(weight_memory_bytes(model.get_base_model()) / 2**20, 1),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "skipped": len(skipped), "bf16": bf16}
    manifest = {"task": "sft", "base": info.to_json(), "method": {"name": method, "config": cfg.to_json()},
                "seed": seed, "history": run["history"],
                "data": {"source": str(data), "eval": str(eval) if eval else f"{cfg.eval_fraction:.0%} of the training file",
                         "skipped": [list(s) for s in skipped][:100]}}
    spec = LMSpecialist(model, tokenizer, manifest, bf16)
    report = side_by_side(spec, held, cfg.side_by_side, cfg.max_new_tokens, progress) if cfg.side_by_side else None
    metrics.update(wall_s=round(time.perf_counter() - t0, 1), peak_mem_mb=round(peak_memory_mb(), 1))
    manifest["metrics"] = metrics
    if out is not None:
        manifest["bundle_name"] = str(out)
        spec.save(out, side_by_side=report)
        spec.manifest["metrics"]["bundle"] = str(out)
    _drop_checkpoints(ckpt)
    return spec


def train_and_held(load: Callable, data, eval, fraction: float, seed: int) -> tuple[list, list, list]:
    """(training examples, held-out examples, skipped rows): `eval` is the held-out file, else a seeded
    `fraction` of `data` is held out."""
    examples, skipped = load(data)
    if eval is None:
        train, held = split_holdout(examples, fraction, seed)
        return train, held, skipped
    held, more = load(eval)
    return examples, held, skipped + more


def side_by_side(spec: LMSpecialist, examples, n: int, max_new_tokens: int, progress: bool = False) -> str:
    """Markdown: the first `n` held-out prompts answered greedily by the base (adapter off) and the tuned model."""
    lines = [f"# Base vs tuned: {n} held-out prompts", "",
             f"Base `{spec.manifest['base']['name']}`, method `{spec.method}`; greedy decoding, "
             f"at most {max_new_tokens} new tokens.", ""]
    for i, ex in enumerate(examples[:n], 1):
        prompt = ex.messages[:_first_answer(ex.messages)]  # system + user turns before the first answer
        with spec.model.disable_adapter():
            base_answer = spec.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        tuned = spec.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        reference = next(m["content"] for m in ex.messages if m["role"] == "assistant")
        lines += [f"## {i}. {prompt[-1]['content'][:300]}", "", "**base**", "", _quote(base_answer), "",
                  "**tuned**", "", _quote(tuned), "", "**reference**", "", _quote(reference[:600]), ""]
    return "\n".join(lines)


def _first_answer(messages: list[dict]) -> int:
    return next(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def _encode(tokenizer, examples, max_length: int) -> tuple[list[dict], int]:
    rows = [encode_chat(tokenizer, ex.messages, max_length) for ex in examples]
    kept = [r for r in rows if any(t != IGNORE for t in r["labels"])]
    return kept, len(rows) - len(kept)


def _config(cls, options: dict[str, Any], seed: int):
    """The validated config; seeds torch (adapter init, dropout) so a run is reproducible and a resumed one continues it."""
    from dataclasses import fields

    torch.manual_seed(seed)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _bf16(value: str, supported: bool) -> bool:
    value = str(value).lower()
    if value == "true" and not supported:
        raise ConfigError("bf16=true, but this CPU has no bfloat16 support (AVX512-BF16 / AMX); use bf16=auto")
    return supported if value == "auto" else value == "true"


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0)) if loss == loss else float("nan")


def _file_key(path: str | Path | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return f"{p.resolve()}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" if p.is_file() else str(p)


def _checkpoint_dir(out, fingerprint: dict) -> Path:
    import json

    if out is not None:
        out = Path(out).resolve()
        return out.with_name(f".{out.name}.checkpoint")
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir("checkpoints") / key


def _drop_checkpoints(ckpt: Path) -> None:
    import shutil

    for p in (ckpt, Path(str(ckpt) + ".old")):
        shutil.rmtree(p, ignore_errors=True)


