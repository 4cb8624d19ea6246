"""`sft`: instruction / chat JSONL -> a generator (a LoRA adapter on a causal LM; `qlora`: on its 4-bit NF4 form).

    spec = headstart.fit("../shared/data/alpaca_en_demo/train.jsonl", task="sft", method="qlora",
                         out="runs/alpaca-qlora")
    spec.manifest["metrics"]["eval_loss_before"], spec.manifest["metrics"]["eval_loss"]

Held-out loss is measured before and after training on `eval` (a file) or a seeded `eval_fraction` of the
training file. `init=BUNDLE` continues an sft/dpo bundle's adapter instead of starting a fresh one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError
from .registry import FitSettings, Start, Task, register_task

DEFAULT_LM = "smollm2-135m"


class SFTTask(Task):
    # Not classify's tune_allocator() (keep freed memory): on the alpaca LoRA epoch (smollm2-135m, 2 cores) the
    # never-unmapping heap fragmented to a 21.4 GB peak. The memory plan (llm/footprint.py) chooses glibc's
    # behaviour from the budget.
    summary = "instruction / chat JSONL -> a generator (LoRA or QLoRA adapter on a causal LM)"
    default_method = "lora"
    inputs = frozenset({"eval"})
    held_share = "the training file"
    """What the held-out share is taken from, for the manifest."""

    def examples(self, path: Any) -> tuple[list, list]:
        """(examples, skipped rows) of one JSONL file in this task's shapes."""
        from ..llm.data import load_sft_examples

        return load_sft_examples(path)

    def method_name(self, method: str | None, init: Path | None) -> str:
        if init is None:
            return method or self.default_method
        from ..bundle import read_manifest

        parent = read_manifest(init).get("method", {}).get("name")
        if method and parent and method != parent:  # the adapter only fits the base it was trained on (4-bit or not)
            raise ConfigError(f"{init} was trained with {parent!r}: continue it with method {parent!r}, not {method!r}")
        return parent or method or self.default_method

    def load_data(self, data, method, settings: FitSettings):
        from ..methods.sft import TuningData

        train, held, skipped = train_and_held(self.examples, data, settings.eval, method.config.eval_fraction,
                                              settings.seed)
        held_from = str(settings.eval) if settings.eval else f"{method.config.eval_fraction:.0%} of {self.held_share}"
        return TuningData(str(data), train, held, skipped, held_from)

    def start(self, base, init: Path | None, data, method, settings: FitSettings) -> Start:
        from ..methods.sft import LMStart


        if init is None:
            from ..llm.model import load_lm

            try:
                model, tokenizer, info = load_lm(base or DEFAULT_LM, quantize=method.quantize)
            except ValueError as e:  # not a causal LM, or one transformers quantised already
                raise ConfigError(str(e)) from None
            return Start(LMStart(model, tokenizer, info.to_json()), info.to_json())
        from ..bundle.generator import LMSpecialist

        parent = LMSpecialist.load(init, trainable=True)
        m = parent.manifest
        if base is not None and base != m["base"]["name"]:
            raise ConfigError(f"{init} is an adapter on {m['base']['name']!r}; it cannot continue on {base!r}")
        settings.log(f"{self.name} from the {m['task']} bundle {init} ({parent.method} on {m['base']['name']})")
        facts = {"bundle": str(init), "task": m["task"], "method": parent.method, "created": m.get("created")}
        return Start(LMStart(parent.model, parent.tokenizer, m["base"]), m["base"], parent=facts)

    def fingerprint(self, data, start: Start, settings: FitSettings) -> dict[str, Any]:
        return {"data": file_key(data.source), "eval": file_key(settings.eval)}

    def artifact(self, result, data, start: Start, method, settings: FitSettings):
        from ..bundle.generator import LMSpecialist

        config = result.config if result.config is not None else method.config
        manifest = {"task": self.name, "base": start.base, "method": {"name": method.name, "config": config.to_json()},
                    "seed": settings.seed, "history": result.history,
                    "data": {"source": data.source, "eval": data.held_from, "skipped": [list(s) for s in data.skipped][:100]}}
        if start.parent is not None:
            manifest["parent"] = start.parent
        if result.training:
            manifest["training"] = result.training
        return LMSpecialist(result.model, start.backbone.tokenizer, manifest, result.details["bf16"])

    def evaluate(self, specialist, data, result, settings: FitSettings) -> dict[str, Any]:
        """The held-out figures the method measured before and after training, with sizes and costs."""
        from ..llm.model import weight_memory_bytes

        model = specialist.model
        metrics = {k: v for k, v in result.details.items() if k != "bf16"}
        metrics.setdefault("train_examples", len(data.train))
        metrics.update(train_s=round(result.train_s, 1),
                       base_weight_mb=round(weight_memory_bytes(model.get_base_model()) / 2**20, 1),
                       trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       skipped=len(data.skipped), bf16=result.details["bf16"])
        return metrics

    def save(self, specialist, data, out: Path, settings: FitSettings) -> Path:
        cfg = specialist.manifest["method"]["config"]
        report = side_by_side(specialist, data.held, cfg["side_by_side"], cfg["max_new_tokens"], settings.progress) \
            if cfg.get("side_by_side") else None
        specialist.manifest["bundle_name"] = str(out)
        return specialist.save(out, side_by_side=report)

    def report(self, specialist, data) -> str:
        m = specialist.manifest["metrics"]
        return (f"{self.name} {specialist.method} on {specialist.manifest['base']['name']} -> {data.source}: held-out "
                f"loss {m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}, {m['tokens_per_s']} tokens/s, "
                f"{m['wall_s']} s")


def train_and_held(load: Callable, data, eval, fraction: float, seed: int) -> tuple[list, list, list]:
    """(training examples, held-out examples, skipped rows): `eval` is the held-out file, else a seeded
    `fraction` of `data` is held out."""
    from ..llm.data import split_holdout

    examples, skipped = load(data)
    if eval is None:
        train, held = split_holdout(examples, fraction, seed)
        return train, held, skipped
    held, more = load(eval)
    return examples, held, skipped + more


def side_by_side(spec, examples, n: int, max_new_tokens: int, progress: bool = False) -> str:
    """Markdown: the first `n` held-out prompts answered greedily by the base (adapter off) and the tuned model."""
    lines = [f"# Base vs tuned: {n} held-out prompts", "",
             f"Base `{spec.manifest['base']['name']}`, method `{spec.method}`; greedy decoding, "
             f"at most {max_new_tokens} new tokens.", ""]
    for i, ex in enumerate(examples[:n], 1):
        first_answer = next(j for j, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompt = ex.messages[:first_answer]  # system + user turns before the first answer
        with spec.model.disable_adapter():
            base_answer = spec.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        tuned = spec.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        reference = next(m["content"] for m in ex.messages if m["role"] == "assistant")
        lines += [f"## {i}. {prompt[-1]['content'][:300]}", "", "**base**", "", _quote(base_answer), "",
                  "**tuned**", "", _quote(tuned), "", "**reference**", "", _quote(reference[:600]), ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def file_key(path: str | Path | None) -> str | None:
    """A file's resolved path and content hash prefix (what a resume fingerprint compares), else its name."""
    if path is None:
        return None
    p = Path(path)
    return f"{p.resolve()}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" if p.is_file() else str(p)


register_task("sft", SFTTask())
