"""One LoRA epoch on TREC with minilm-l6, run either by headstart or by plain PEFT + transformers Trainer.

Each run happens in its own process (so peak memory is that run's own) and prints one JSON
line: {"runner", "epoch_s", "examples_per_s", "peak_mem_mb", "accuracy"}. Both runners use the
same data, tokenizer, max length, LoRA targets/rank/alpha/dropout, batch size, learning rate,
warm-up + schedule shape, weight decay and seed; the Trainer side pools and classifies exactly
like headstart's specialist (mean pooling + linear head).

    python bench/lora_baseline.py headstart
    python bench/lora_baseline.py trainer
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("HEADSTART_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SETTINGS = dict(r=8, alpha=16, dropout=0.05, batch_size=32, lr=1e-3, head_lr=1e-3, weight_decay=0.01,
                warmup_ratio=0.1, epochs=1, seed=0)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_headstart() -> dict:
    import headstart

    s = SETTINGS
    spec = headstart.fit(DATA / "trec", base="minilm-l6", method="lora", seed=s["seed"], progress=False,
                         log=lambda *_: None, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                         head_lr=s["head_lr"], weight_decay=s["weight_decay"], warmup_ratio=s["warmup_ratio"],
                         r=s["r"], alpha=s["alpha"], dropout=s["dropout"], patience=0, head_init="random")
    epoch = spec.manifest["history"][0]
    n = spec.manifest["data"]["train_examples"] - spec.manifest["details"]["selection_examples"]
    return {"runner": "headstart", "epoch_s": epoch["epoch_s"], "examples_per_s": n / epoch["epoch_s"],
            "peak_mem_mb": peak_mb(), "accuracy": spec.manifest["metrics"]["accuracy"], "train_examples": n}


def run_trainer() -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModel, AutoTokenizer, Trainer, TrainingArguments

    from headstart.bases.text import mean_pool, minilm_dir
    from headstart.data import load_dataset
    from headstart.engine.perf import tune_allocator

    tune_allocator()  # the same allocator settings headstart uses, so only the loop differs
    s = SETTINGS
    torch.manual_seed(s["seed"])
    data = load_dataset(DATA / "trec")
    train, _ = data.selection_splits(s["seed"])  # the same 90% headstart trains on
    folder = minilm_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False)
    encoder = get_peft_model(encoder, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                                 target_modules=["query", "key", "value", "dense"], bias="none"))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(384, len(data.classes))

        def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            logits = self.head(mean_pool(hidden, attention_mask))
            loss = nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    rows = [{"text": t, "labels": y} for t, y in zip(train.items, train.labels)]

    def collate(batch):
        enc = tok([b["text"] for b in batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc["labels"] = torch.tensor([b["labels"] for b in batch])
        return dict(enc)

    steps = math.ceil(len(rows) / s["batch_size"]) * s["epochs"]
    args = TrainingArguments(output_dir="/tmp/hs-bench-trainer", per_device_train_batch_size=s["batch_size"],
                             learning_rate=s["lr"], weight_decay=s["weight_decay"],
                             warmup_steps=math.ceil(s["warmup_ratio"] * steps),  # transformers 5 has no warmup_ratio
                             lr_scheduler_type="cosine", num_train_epochs=s["epochs"], seed=s["seed"],
                             save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                             max_grad_norm=1.0)
    trainer = Trainer(model=Classifier(), args=args, train_dataset=rows, data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    epoch_s = time.perf_counter() - t0
    return {"runner": "trainer", "epoch_s": epoch_s, "examples_per_s": len(rows) / epoch_s, "peak_mem_mb": peak_mb(),
            "train_examples": len(rows)}


if __name__ == "__main__":
    runner = sys.argv[1] if len(sys.argv) > 1 else "headstart"
    out = run_headstart() if runner == "headstart" else run_trainer()
    print(json.dumps(out))
