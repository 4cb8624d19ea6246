"""Instruction tuning end to end on the real SmolLM2-135M and real alpaca rows (marker `real`; `make test` runs them).

Small on purpose (a few dozen short rows): the full epoch is bench/sft.py's job. What only the real
base can show: the real chat template's answer masking, the bitsandbytes CPU repacking trap on real
weight shapes (it bites only when a layer fits bnb's packed layout), and the QLoRA weight saving.
"""
from __future__ import annotations

import json

import pytest
import torch

import headstart
from headstart.llm.generate import generate
from headstart.llm.model import add_lora, load_lm, weight_memory_bytes
from headstart.llm.tokenize import IGNORE, encode_chat, encode_prompt

pytestmark = pytest.mark.real
QUIET = {"progress": False, "log": lambda s: None}
SMALL = {"epochs": 1, "batch_size": 4, "max_length": 192, "side_by_side": 1, "max_new_tokens": 12}


def _short_rows(path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    short = [r for r in rows if len(r["instruction"]) + len(r.get("input", "")) + len(r["output"]) < 400]
    return short[:n]


@pytest.fixture(scope="module")
def alpaca_small(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("alpaca-small")
    src = data_root / "alpaca_en_demo"
    for name, n in (("train.jsonl", 24), ("test.jsonl", 8)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in _short_rows(src / name, n)))
    return root


def test_real_chat_template_labels_only_the_answers():
    tokenizer = headstart.load_base("smollm2-135m").tokenizer
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."},
                {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green.\n\n- grass"}]
    row = encode_chat(tokenizer, messages)
    labelled = [[]]
    for token, label in zip(row["input_ids"], row["labels"]):
        if label == IGNORE:
            if labelled[-1]:
                labelled.append([])
        else:
            labelled[-1].append(token)
    assert [tokenizer.decode(s) for s in labelled if s] == ["Blue, like the sky.<|im_end|>", "Green.\n\n- grass<|im_end|>"]
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\n")  # SmolLM2's default system turn
    prompt = encode_prompt(tokenizer, messages[:1])
    assert row["input_ids"][: len(prompt)] == prompt


def test_qlora_on_real_smollm2_keeps_gradients_after_generate_and_saves_weight_memory():
    fp32, _, _ = load_lm("smollm2-135m")
    fp32_bytes = weight_memory_bytes(fp32)
    nf4, tokenizer, _ = load_lm("smollm2-135m", quantize="nf4")
    assert weight_memory_bytes(nf4) <= 0.35 * fp32_bytes
    model = add_lora(nf4, r=8, alpha=16, dropout=0.0)
    answer = generate(model, tokenizer, "Name a colour.", max_new_tokens=6, temperature=0)
    assert isinstance(answer, str) and answer.strip()
    ids = tokenizer("The sky is blue and the grass is green.", return_tensors="pt")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 30 * 7  # every linear of every layer
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_lora_sft_on_real_alpaca_then_generate_evaluate_export(alpaca_small, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = headstart.fit(alpaca_small / "train.jsonl", base="smollm2-135m", task="sft", method="lora",
                         eval=alpaca_small / "test.jsonl", out=tmp_path / "lora", **QUIET, **SMALL)
    m = spec.manifest["metrics"]
    assert m["train_examples"] == 24 and m["eval_examples"] == 8
    assert 0.5 < m["eval_loss"] < 4 and abs(m["eval_loss"] - m["eval_loss_before"]) < 0.5
    assert m["tokens_per_s"] > 0 and m["peak_mem_mb"] > 0
    assert (tmp_path / "lora" / "report" / "side_by_side.md").read_text().count("**tuned**") == 1

    loaded = headstart.load(tmp_path / "lora")
    pieces: list[str] = []
    answer = loaded.generate("Give one tip for staying healthy.", max_new_tokens=16, temperature=0, stream=pieces.append)
    assert answer.strip() and "".join(pieces) == answer and "<|im_end|>" not in answer
    assert loaded.evaluate(alpaca_small / "test.jsonl")["loss"] == pytest.approx(m["eval_loss"], abs=2e-2)

    merged_dir = loaded.export_merged(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = loaded.tokenizer("Give one tip for staying healthy.", return_tensors="pt")["input_ids"]
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
