"""Instruction tuning of causal LMs: LoRA / QLoRA SFT, DPO, generation and merged export."""
