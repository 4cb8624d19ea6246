"""The same LoRA SFT through TRL's SFTTrainer (benchmark environment only; run by bench/sft.py).

    python bench/sft_trl.py TRAIN.jsonl TEST.jsonl EPOCHS [on|off]   -> last stdout line: JSON metrics

Same base (smollm2-135m, the dequantised fp32 folder headstart caches), same chat template, loss on
the answers only (TRL's prompt/completion format), LoRA r=8 alpha=16 dropout 0.05 on all linear
layers, batch 8, lr 2e-4 cosine with 3% warm-up, max_length 512, bf16 when the CPU has it, batches
grouped by length as headstart groups them, no checkpoint saving. Per-layer gradient checkpointing: `on`
(TRL's default) or `off` (TRL's fastest on a CPU; headstart's plan skips it too when the budget has room).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def rows(path: Path) -> list[dict]:
    from headstart.llm.data import load_sft_examples

    examples, _ = load_sft_examples(path)
    out = []
    for ex in examples:
        first = next(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        out.append({"prompt": ex.messages[:first], "completion": [ex.messages[first]]})
    return out


def main() -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from headstart.llm.model import cpu_supports_bf16, load_lm

    train_path, test_path, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    checkpointing = (sys.argv[4] if len(sys.argv) > 4 else "on") == "on"
    torch.manual_seed(0)
    model, tokenizer, _ = load_lm("smollm2-135m", quantize=None)
    bf16 = cpu_supports_bf16()
    config = SFTConfig(output_dir=str(Path("/tmp") / "hs-trl-sft"), num_train_epochs=epochs, per_device_train_batch_size=8,
                       per_device_eval_batch_size=8, learning_rate=2e-4, lr_scheduler_type="cosine",
                       warmup_steps=0.03, max_length=512, bf16=bf16, use_cpu=True, gradient_checkpointing=checkpointing,
                       gradient_checkpointing_kwargs={"use_reentrant": False},
                       train_sampling_strategy="group_by_length", completion_only_loss=True, packing=False,
                       logging_steps=10, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows(train_path)),
                         eval_dataset=Dataset.from_list(rows(test_path)), processing_class=tokenizer, peft_config=lora)
    before = trainer.evaluate()["eval_loss"]
    # Tokens the model actually processes (answers and prompts, no padding), as headstart counts them.
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset) * epochs
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    after = trainer.evaluate()["eval_loss"]
    print(json.dumps({"eval_loss_before": before, "eval_loss": after, "train_s": round(train_s, 1),
                      "wall_s": round(train_s, 1), "tokens": tokens, "tokens_per_s": round(tokens / train_s, 1),
                      "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "bf16": bf16, "eval_perplexity": math.exp(after), "gradient_checkpointing": checkpointing}))


if __name__ == "__main__":
    main()
