"""One run of the `setfit` library (benchmark environment only: `pip install -r bench/requirements.txt`).

    python bench/setfit_library.py sst5 8 0 [mpnet-base]   # dataset, shots per class, seed, base

Trains SetFit on exactly the subset headstart samples (`Dataset.with_shots(k, seed)`) with the same
body headstart uses (the base's own sentence-transformers folder: minilm-l6 by default, or mpnet-base), using the SetFit paper's recipe (batch 16, 20 pair iterations, 1 epoch, body
lr 2e-5, logistic-regression head), and prints one JSON line: accuracy on the full test split and
the training wall time.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import headstart
from headstart.bases.minilm import minilm_dir
from headstart.bases.mpnet import mpnet_dir

BODIES = {"minilm-l6": minilm_dir, "mpnet-base": mpnet_dir}

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HEADSTART_DATA", ROOT.parent / "shared" / "data"))


def main(dataset: str, shots: int, seed: int, base: str = "minilm-l6") -> dict:
    from datasets import Dataset as HFDataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    data = headstart.load_dataset(DATA / dataset).with_shots(shots, seed)
    train, test = data.split("train"), data.split(data.eval_split)
    model = SetFitModel.from_pretrained(str(BODIES[base]()))
    # The trainer's checkpoints (1.3 GB for mpnet) are thrown away with the directory: only the model in memory is scored.
    with tempfile.TemporaryDirectory(prefix="setfit-lib-") as scratch:
        args = TrainingArguments(output_dir=scratch, batch_size=16, num_iterations=20,
                                 num_epochs=1, body_learning_rate=2e-5, seed=seed, report_to="none")
        trainer = Trainer(model=model, args=args,
                          train_dataset=HFDataset.from_dict({"text": train.items, "label": train.labels}))
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    pred = np.asarray(model.predict(test.items, batch_size=64))
    return {"dataset": dataset, "shots": shots, "seed": seed, "base": base, "accuracy": float((pred == np.asarray(test.labels)).mean()),
            "train_s": round(train_s, 2), "train_examples": len(train)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])), flush=True)
