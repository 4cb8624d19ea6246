"""A tuned generator: the base LM + a PEFT adapter. Generate, evaluate (loss / perplexity), export, save, load.

    spec = headstart.load("runs/alpaca-lora")          # an sft / dpo bundle
    spec.generate("Give three tips for staying healthy.", stream=print)
    spec.evaluate("../shared/data/alpaca_en_demo/test.jsonl")   # {"loss": ..., "perplexity": ...}
    spec.export_merged("merged-model/")                # a plain transformers folder

The bundle holds the adapter only (PEFT's own folder, named in the manifest's `adapters`), the
base referenced by name + weights sha256, the report (`report/side_by_side.md`), a model card and
metrics. Several generator bundles can share one loaded base: each adds its adapter under its own
name and switches to it before it runs.
"""
from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from ..core.errors import BundleError
from ..llm.tokenize import IGNORE, encode_chat
from ..llm.train import response_loss
from .format import ADAPTER_DIR, check_base
from .manifest import DEFAULT, GENERATIVE_TASKS
from .specialist import BundleSpecialist, reraise_as_bundle_error

REPORT_DIR = "report"
LM_TASKS = GENERATIVE_TASKS
_shared_names = itertools.count(1)


class LMSpecialist(BundleSpecialist):
    """A causal LM with a PEFT adapter (sft / dpo), from `fit(task=...)` or a generator bundle.

    >>> spec = headstart.load("runs/alpaca-lora")
    >>> spec.generate("Name a colour.", temperature=0.0, max_new_tokens=8)
    """

    bundle_kind = "generator"

    def __init__(self, model, tokenizer, manifest: dict[str, Any], bf16: bool = False, side_by_side: str | None = None):
        super().__init__(manifest)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bf16 = bf16
        self.side_by_side = side_by_side
        """The base-vs-tuned report written to `report/side_by_side.md` on save."""
        self.shared_base = False
        """True when other specialists' adapters sit in the same base modules (`load(..., base=)`)."""

    @property
    def method(self) -> str:
        return self.manifest["method"]["name"]

    @property
    def adapter_name(self) -> str:
        """The name PEFT knows this specialist's adapter by (not "default" when it shares its base)."""
        return getattr(self.model, "active_adapter", DEFAULT)

    def _activate(self) -> None:
        # On a shared base every specialist's LoRA layers sit in the same modules: switch to ours.
        if self.shared_base:
            self.model.set_adapter(self.adapter_name, inference_mode=not self.model.training)

    # ---- use -----------------------------------------------------------------------------
    def generate(self, prompt: str | list[dict], stream: Callable[[str], None] | None = None, **options: Any) -> str:
        """Answer one prompt (a string or chat messages); `stream` receives the text as it is produced.
        Options: max_new_tokens, temperature (0 = greedy), top_p, repetition_penalty, seed."""
        from ..llm.generate import generate

        self._activate()
        return generate(self.model, self.tokenizer, prompt, stream=stream, **options)

    def evaluate(self, data: str | Path, split: str | None = None, progress: bool = False,
                 batch_size: int = 8) -> dict[str, Any]:
        """Mean loss per response token and perplexity on held-out instruction data (a JSONL file in the
        SFT shapes, evaluated whole; `split` is accepted for symmetry with classifiers and unused)."""
        from ..llm.data import load_sft_examples

        self._activate()
        examples, skipped = load_sft_examples(data)
        max_length = self.manifest["method"]["config"].get("max_length", 512)
        rows = [r for r in (encode_chat(self.tokenizer, ex.messages, max_length) for ex in examples)
                if any(t != IGNORE for t in r["labels"])]
        loss, tokens = response_loss(self.model, rows, self.tokenizer.pad_token_id, batch_size, self.bf16)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(rows),
                "response_tokens": tokens, "skipped": len(skipped), "split": str(data)}

    def export_merged(self, out: str | Path) -> Path:
        """The adapter merged into the full-precision base, saved as a transformers model folder.
        QLoRA adapters merge against the dequantised fp32 base (merging into 4-bit weights is lossy).
        Works before the specialist was ever saved: the adapter in memory is used."""
        from ..llm.export import adapter_on_fp32_base, merge_adapter_into_base, save_merged
        from ..llm.model import load_lm

        fp32, tokenizer, _ = load_lm(self.manifest["base"]["name"], quantize=None)
        with tempfile.TemporaryDirectory(prefix="headstart-adapter-") as scratch:
            adapter = self.export_adapter(Path(scratch) / ADAPTER_DIR)
            peft_model = adapter_on_fp32_base(adapter, fp32)
            return save_merged(merge_adapter_into_base(peft_model), tokenizer, Path(out))

    def export_adapter(self, out: str | Path) -> Path:
        """This specialist's adapter alone, as PEFT's folder (`PeftModel.from_pretrained(base, out)`)."""
        out = Path(out)
        if out.exists():
            raise BundleError(f"{out} already exists; choose a new folder for the adapter")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.peft-", dir=out.parent))
        try:
            self.model.save_pretrained(str(staging), selected_adapters=[self.adapter_name],
                                       save_embedding_layers=False)
            # PEFT writes any adapter but "default" into a subfolder named after it.
            (staging if self.adapter_name == DEFAULT else staging / self.adapter_name).replace(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out

    # ---- bundle ----------------------------------------------------------------------------
    def save(self, folder: str | Path, side_by_side: str | None = None) -> Path:
        """Write the bundle (adapter, report, card, metrics) atomically."""
        if side_by_side is not None:
            self.side_by_side = side_by_side
        return super().save(folder)

    def write_extras(self, tmp: Path, full: dict[str, Any]) -> None:
        self.export_adapter(tmp / ADAPTER_DIR)
        if self.side_by_side:
            (tmp / REPORT_DIR).mkdir()
            (tmp / REPORT_DIR / "side_by_side.md").write_text(self.side_by_side)

    def bundle_manifest(self) -> dict[str, Any]:
        manifest = super().bundle_manifest()
        self.model.peft_config[self.adapter_name].base_model_name_or_path = manifest["base"]["name"]
        return manifest

    def base_model_relation(self) -> str:
        return "adapter"

    @classmethod
    def load(cls, folder: str | Path, trainable: bool = False, base: Any = None,
             adapter: str | None = None) -> "LMSpecialist":
        """Rebuild base + adapter; refuses a base whose weights hash differs. No code from the bundle runs.

        `base`: an already loaded causal-LM Backbone to share with other generator bundles (each adds
        its adapter to the same modules and switches to it when it runs); not with `trainable`.
        `adapter`: which of the bundle's adapters (default: "default", or the only one).

        >>> base = headstart.load_base("smollm2-135m")
        >>> terse, chatty = (headstart.load(f, base=base) for f in ("runs/terse", "runs/chatty"))
        """
        from peft import PeftModel

        from ..llm.model import bf16_enabled, load_lm

        folder = Path(folder)
        manifest = cls.open_manifest(folder)
        if manifest.get("task") not in LM_TASKS:
            raise BundleError(f"{folder}: not a generative (sft/dpo) bundle")
        if base is not None and trainable:
            raise BundleError(f"{folder}: a shared base cannot be trained; load it without base= to train")
        if base is not None and getattr(getattr(base, "info", None), "kind", None) != "causal_lm":
            raise BundleError(f"{folder}: a generator bundle shares only a loaded causal-LM base, "
                              f"not a {type(base).__name__}")
        adapter_dir = cls.adapter_folder(folder, manifest, adapter)
        quantize = "nf4" if manifest["method"]["name"] == "qlora" else None
        try:
            model, tokenizer, info = load_lm(base if base is not None else manifest["base"]["name"], quantize=quantize)
        except ValueError as e:  # the named base is not a causal LM
            raise reraise_as_bundle_error(folder, "its base cannot be loaded as a causal LM", e) from None
        check_base(manifest, info.sha256)
        name = f"shared{next(_shared_names)}" if base is not None else DEFAULT  # unique in the shared modules
        try:
            with warnings.catch_warnings():  # peft warns when a second adapter joins modules that hold one
                warnings.simplefilter("ignore")
                peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name,
                                                       is_trainable=trainable)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise reraise_as_bundle_error(folder, f"its adapter {adapter_dir.name}/ does not fit its base", e) from None
        bf16 = bf16_enabled(manifest["method"]["config"].get("bf16", "auto"))
        spec = cls(peft_model, tokenizer, manifest, bf16)
        spec.folder = folder
        spec.shared_base = base is not None
        return spec


