"""A tuned generator: the base LM + a PEFT adapter. Generate, evaluate (loss / perplexity), export, save, load.

    spec = headstart.load("runs/alpaca-lora")          # an sft / dpo bundle
    spec.generate("Give three tips for staying healthy.", stream=print)
    spec.evaluate("../shared/data/alpaca_en_demo/test.jsonl")   # {"loss": ..., "perplexity": ...}
    spec.export_merged("merged-model/")                # a plain transformers folder

The bundle holds the adapter only (PEFT's own folder `adapter/`), the base referenced by name +
weights sha256, the report (`report/side_by_side.md`), a model card and metrics.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from . import check_base, read_manifest, write_bundle
from ..core.errors import BundleError
from ..llm.tokenize import IGNORE, encode_chat, pad_batch
from ..llm.train import answer_loss, autocast

ADAPTER_DIR = "adapter"
REPORT_DIR = "report"
LM_TASKS = ("sft", "dpo")


class LMSpecialist:
    def __init__(self, model, tokenizer, manifest: dict[str, Any], bf16: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.bf16 = bf16
        self.is_main_process = True

    @property
    def method(self) -> str:
        return self.manifest["method"]["name"]

    # ---- use -----------------------------------------------------------------------------
    def generate(self, prompt: str | list[dict], stream: Callable[[str], None] | None = None, **options: Any) -> str:
        """Answer one prompt (a string or chat messages); `stream` receives the text as it is produced.
        Options: max_new_tokens, temperature (0 = greedy), top_p, repetition_penalty, seed."""
        from ..llm.generate import generate

        return generate(self.model, self.tokenizer, prompt, stream=stream, **options)

    def evaluate(self, data: str | Path, split: str | None = None, progress: bool = False,
                 batch_size: int = 8) -> dict[str, Any]:
        """Mean loss per response token and perplexity on held-out instruction data (a JSONL file in the
        SFT shapes, evaluated whole; `split` is accepted for symmetry with classifiers and unused)."""
        from ..llm.data import load_sft_examples

        examples, skipped = load_sft_examples(data)
        max_length = self.manifest["method"]["config"].get("max_length", 512)
        rows = [r for r in (encode_chat(self.tokenizer, ex.messages, max_length) for ex in examples)
                if any(t != IGNORE for t in r["labels"])]
        loss, tokens = response_loss(self.model, rows, self.tokenizer.pad_token_id, batch_size, self.bf16)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(rows),
                "response_tokens": tokens, "skipped": len(skipped), "split": str(data)}

    def export_merged(self, out: str | Path) -> Path:
        """The adapter merged into the full-precision base, saved as a transformers model folder.
        QLoRA adapters merge against the dequantised fp32 base (merging into 4-bit weights is lossy)."""
        from ..llm.export import adapter_on_fp32_base, merge_adapter_into_base, save_merged
        from ..llm.model import load_lm

        fp32, tokenizer, _ = load_lm(self.manifest["base"]["name"], quantize=None)
        peft_model = adapter_on_fp32_base(self._folder / ADAPTER_DIR, fp32)
        return save_merged(merge_adapter_into_base(peft_model), tokenizer, Path(out))

    # ---- bundle ----------------------------------------------------------------------------
    def save(self, folder: str | Path, side_by_side: str | None = None) -> Path:
        manifest = {k: v for k, v in self.manifest.items()
                    if k not in ("format", "format_version", "files", "versions", "created")}

        def extras(tmp: Path, full: dict) -> None:
            self.model.save_pretrained(str(tmp / ADAPTER_DIR), save_embedding_layers=False)
            (tmp / "metrics.json").write_text(json.dumps(full.get("metrics", {}), indent=2, default=float))
            if side_by_side:
                (tmp / REPORT_DIR).mkdir()
                (tmp / REPORT_DIR / "side_by_side.md").write_text(side_by_side)
            (tmp / "README.md").write_text(_card(full))

        self.model.peft_config["default"].base_model_name_or_path = manifest["base"]["name"]
        out = write_bundle(folder, manifest, {}, extras)
        self.manifest = read_manifest(out)
        self._folder = out
        return out

    @classmethod
    def load(cls, folder: str | Path, trainable: bool = False) -> "LMSpecialist":
        """Rebuild base + adapter; refuses a base whose weights hash differs. No code from the bundle runs."""
        from peft import PeftModel

        from ..llm.model import cpu_supports_bf16, load_lm

        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest.get("task") not in LM_TASKS:
            raise BundleError(f"{folder}: not a generative (sft/dpo) bundle")
        quantize = "nf4" if manifest["method"]["name"] == "qlora" else None
        model, tokenizer, info = load_lm(manifest["base"]["name"], quantize=quantize)
        check_base(manifest, info.sha256)
        peft_model = PeftModel.from_pretrained(model, str(folder / ADAPTER_DIR), is_trainable=trainable)
        bf16 = _bf16_setting(manifest["method"]["config"].get("bf16", "auto"), cpu_supports_bf16())
        spec = cls(peft_model, tokenizer, manifest, bf16)
        spec._folder = folder
        return spec


def response_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8, bf16: bool = False) -> tuple[float, int]:
    """(mean cross-entropy per labelled token, number of labelled tokens) -- token-weighted over batches."""
    if not rows:
        return float("nan"), 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # little padding
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = pad_batch([rows[i] for i in order[start:start + batch_size]], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
            with autocast(bf16):
                loss = answer_loss(model, batch)
            total += loss.float().item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1), count


def _bf16_setting(value: str | bool, supported: bool) -> bool:
    value = str(value).lower()
    return supported if value == "auto" else value == "true"


def _card(m: dict) -> str:
    metrics = m.get("metrics", {})
    lines = [f"# {m.get('bundle_name', 'headstart LM specialist')}", "",
             f"{m['task'].upper()} of `{m['base']['name']}` with `{m['method']['name']}` "
             f"(adapter only; base weights sha256 `{m['base']['sha256'][:12]}...`).", "",
             "| metric | value |", "|---|---|"]
    for k in ("eval_loss_before", "eval_loss", "eval_perplexity", "reward_accuracy_before", "reward_accuracy",
              "train_examples", "eval_examples", "tokens_per_s", "wall_s", "peak_mem_mb"):
        if metrics.get(k) is not None:
            v = metrics[k]
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "Load: `headstart.load(folder)`; generate: `headstart generate FOLDER \"prompt\"`; "
              "merge: `headstart export FOLDER --merged --out DIR`.", ""]
    if m.get("data"):
        lines.append(f"Data: `{m['data'].get('source')}`.")
    return "\n".join(lines) + "\n"
