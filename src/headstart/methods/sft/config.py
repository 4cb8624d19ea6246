"""Options of supervised fine-tuning (`task sft`, methods lora and qlora).

Every field becomes a CLI flag with its docstring as help text.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...core.config import Config


@dataclass
class SFTConfig(Config):
    """Supervised fine-tuning on instruction/chat data: LoRA on the fp32 base, or QLoRA on a 4-bit NF4 base."""

    epochs: int = 1
    """Passes over the training examples."""
    batch_size: int = 8
    """Sequences per optimizer step (length-grouped to waste little padding)."""
    lr: float = 2e-4
    """Peak learning rate of the adapter (warm-up, then cosine to 0)."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming the learning rate up."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on the adapter."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (update = alpha / r * B @ A)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str = "all-linear"
    """Comma-separated module names to adapt, or `all-linear` (every projection of attention and MLP)."""
    max_length: int = 512
    """Tokens per example (longer conversations are cut at the end)."""
    packing: bool = False
    """Concatenate examples into max_length blocks (no padding at all; examples may attend across a boundary)."""
    bf16: str = "auto"
    """bfloat16 autocast: `auto` (when the CPU has AVX512-BF16/AMX or a GPU supports it), `true`, `false`."""
    gradient_checkpointing: str = "auto"
    """Per-layer activation checkpointing: `auto` (the memory plan decides: off unless the budget needs it;
    it costs the recompute and, in a tight budget, returning freed memory to the OS), `true`, `false`."""
    micro_batch: int = 0
    """Sequences per forward, the rest of batch_size accumulated (0: the memory plan chooses; on a CPU 2 or 1
    is fastest when it fits: no padding, a working set that stays in cache)."""
    eval_fraction: float = 0.1
    """Held-out share of the training file for eval loss when no --eval file is given."""
    checkpoint_every: int = 50
    """Optimizer steps between resume checkpoints (adapter + optimizer state)."""
    side_by_side: int = 10
    """Held-out prompts answered by the base and the tuned model into the bundle's report (0: none)."""
    max_new_tokens: int = 128
    """Answer length for the side-by-side report."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "r", "alpha", "max_length", "checkpoint_every", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.dropout < 1:
            raise ValueError("need lr > 0, 0 <= warmup_ratio < 1, 0 <= dropout < 1")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            raise ValueError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        self.gradient_checkpointing = str(self.gradient_checkpointing).lower()
        if self.gradient_checkpointing not in ("auto", "true", "false"):
            raise ValueError(f"gradient_checkpointing must be auto, true or false, got {self.gradient_checkpointing!r}")
        if self.micro_batch < 0:
            raise ValueError("micro_batch must be >= 0")
        if self.side_by_side < 0:
            raise ValueError("side_by_side must be >= 0")

    def targets(self) -> list[str] | str:
        return "all-linear" if self.target_modules == "all-linear" else self.target_modules.split(",")
