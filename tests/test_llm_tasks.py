"""`fit --task sft|dpo`, the LM bundle, generate / evaluate / export, end to end on the tiny random Llama."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import headstart
from headstart.core.errors import ConfigError, DataError
from headstart.bundle.generator import LMSpecialist

from conftest import assert_clean_error, headstart_cli

QUIET = {"progress": False, "log": lambda s: None}
FAST = {"epochs": 3, "batch_size": 4, "lr": 5e-3, "max_length": 96, "side_by_side": 2, "max_new_tokens": 8,
        "bf16": "false"}
ANSWERS = {"colour of the sky": "blue", "colour of grass": "green", "colour of snow": "white",
           "colour of coal": "black", "colour of blood": "red", "colour of a lemon": "yellow"}


def alpaca_rows(n: int) -> list[dict]:
    items = list(ANSWERS.items())
    return [{"instruction": f"What is the {q}?", "input": "" if i % 2 else "Answer in one word.", "output": a}
            for i, (q, a) in enumerate(items[j % len(items)] for j in range(n))]


def write_jsonl(path: Path, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-data")
    train = write_jsonl(root / "train.jsonl", alpaca_rows(24), extra_lines=("not json", '{"nothing": "known"}'))
    test = write_jsonl(root / "test.jsonl", alpaca_rows(6))
    prefs = write_jsonl(root / "prefs.jsonl", [{"prompt": f"What is the {q}?", "chosen": a, "rejected": "purple"}
                                               for q, a in ANSWERS.items()] * 3)
    return {"train": train, "test": test, "prefs": prefs, "root": root}


@pytest.fixture(scope="module")
def sft_bundle(sft_files):
    out = sft_files["root"] / "bundle-lora"
    spec = headstart.fit(sft_files["train"], base="tiny-llm", method="lora", task="sft", eval=sft_files["test"],
                         out=out, **QUIET, **FAST)
    return spec, out


def test_sft_lowers_held_out_loss_and_reports(sft_bundle):
    spec, out = sft_bundle
    m = spec.manifest["metrics"]
    assert m["eval_loss"] < m["eval_loss_before"] - 0.1, m  # the tiny model learns the colour answers
    assert m["train_examples"] == 24 and m["eval_examples"] == 6 and m["skipped"] == 2
    for k in ("tokens_per_s", "wall_s", "peak_mem_mb", "eval_perplexity", "base_weight_mb"):
        assert m[k] > 0, k


def test_sft_bundle_holds_only_the_adapter(sft_bundle):
    _, out = sft_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "sft" and manifest["method"]["name"] == "lora"
    assert manifest["base"]["name"] == "tiny-llm" and len(manifest["base"]["sha256"]) == 64
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-llm"
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert all("lora_" in k for k in f.keys())
    side = (out / "report" / "side_by_side.md").read_text()
    assert side.count("**base**") == 2 and side.count("**tuned**") == 2
    assert (out / "README.md").is_file() and json.loads((out / "metrics.json").read_text())["eval_loss"] > 0


def test_bundle_reloads_to_the_same_model(sft_bundle, sft_files):
    spec, out = sft_bundle
    loaded = headstart.load(out)
    assert isinstance(loaded, LMSpecialist)
    batch = loaded.tokenizer(["What is the colour of snow?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, spec.model(**batch).logits, atol=1e-5, rtol=0)
    again = loaded.evaluate(sft_files["test"])
    assert again["examples"] == 6
    assert again["loss"] == pytest.approx(spec.manifest["metrics"]["eval_loss"], rel=1e-4)
    pieces: list[str] = []
    answer = loaded.generate("What is the colour of snow?", temperature=0.0, max_new_tokens=6, stream=pieces.append)
    assert "".join(pieces).strip() == answer.strip()


def test_export_merged_reproduces_the_adapter_model(sft_bundle, tmp_path):
    from transformers import AutoModelForCausalLM

    spec, out = sft_bundle
    merged = headstart.load(out).export_merged(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    batch = spec.tokenizer(["What is the colour of coal?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, spec.model(**batch).logits, atol=1e-4, rtol=0)


def test_dpo_from_the_sft_bundle(sft_bundle, sft_files):
    _, sft_out = sft_bundle
    out = sft_files["root"] / "bundle-dpo"
    spec = headstart.fit(sft_files["prefs"], base=str(sft_out), task="dpo", out=out, **QUIET,
                         **{**FAST, "lr": 5e-3, "batch_size": 2})
    m = spec.manifest["metrics"]
    assert spec.manifest["parent"]["bundle"] == str(sft_out) and spec.manifest["method"]["name"] == "lora"
    assert m["eval_dpo_loss"] < m["eval_dpo_loss_before"], m  # the policy moves towards the chosen answers
    assert m["reward_accuracy"] > 0.5
    loaded = headstart.load(out)
    assert loaded.manifest["task"] == "dpo" and loaded.generate("What is the colour of grass?", max_new_tokens=4)


def test_qlora_sft_trains_the_adapter(sft_files, tmp_path):
    spec = headstart.fit(sft_files["train"], base="tiny-llm", method="qlora", task="sft", eval=sft_files["test"],
                         out=tmp_path / "q", **QUIET, **{**FAST, "side_by_side": 1})
    m = spec.manifest["metrics"]
    assert m["eval_loss"] < m["eval_loss_before"], m  # gradients flowed after the side-by-side generate
    loaded = headstart.load(tmp_path / "q")
    assert type(loaded.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_resume_after_interruption_matches_an_uninterrupted_run(sft_files, tmp_path):
    import headstart.llm.train as train_mod

    opts = {**QUIET, **FAST, "side_by_side": 0, "checkpoint_every": 2, "epochs": 2}
    full = headstart.fit(sft_files["train"], base="tiny-llm", method="lora", task="sft", out=tmp_path / "a", **opts)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def flaky_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = flaky_step
    try:
        with pytest.raises(KeyboardInterrupt):
            headstart.fit(sft_files["train"], base="tiny-llm", method="lora", task="sft", out=tmp_path / "b", **opts)
    finally:
        torch.optim.AdamW.step = real_step
    assert (tmp_path / ".b.checkpoint").is_dir() and not (tmp_path / "b").exists()
    resumed = headstart.fit(sft_files["train"], base="tiny-llm", method="lora", task="sft", out=tmp_path / "b",
                            resume=True, **opts)
    assert resumed.manifest["metrics"]["eval_loss"] == pytest.approx(full.manifest["metrics"]["eval_loss"], abs=1e-5)
    assert not (tmp_path / ".b.checkpoint").exists()
    del train_mod


def test_errors(sft_files, tmp_path):
    with pytest.raises(ConfigError, match="qlora"):
        headstart.fit(sft_files["train"], base="tiny-llm", method="finetune", task="sft", **QUIET)
    with pytest.raises(ConfigError, match="no option"):
        headstart.fit(sft_files["train"], base="tiny-llm", method="lora", task="sft", unfreeze="2", **QUIET)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "y"}])
    with pytest.raises(DataError):
        headstart.fit(bad, base="tiny-llm", method="lora", task="sft", **QUIET)


def test_cli_fit_generate_evaluate_export(sft_files, tmp_path):
    out = tmp_path / "cli-bundle"
    r = headstart_cli("fit", sft_files["train"], "--base", "tiny-llm", "--task", "sft", "--method", "lora",
                      "--epochs", "1", "--side-by-side", "0", "--bf16", "false", "--max-length", "96",
                      "--out", out, "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"eval_loss_before", "eval_loss", "tokens_per_s", "wall_s", "peak_mem_mb"} <= set(metrics)
    r = headstart_cli("generate", out, "What is the colour of snow?", "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = headstart_cli("evaluate", out, sft_files["test"], "--json")
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["perplexity"] > 1
    r = headstart_cli("export", out, "--merged", "--out", tmp_path / "merged")
    assert r.returncode == 0 and (tmp_path / "merged" / "config.json").is_file(), r.stderr[-2000:]
    assert_clean_error(headstart_cli("generate", tmp_path / "nowhere", "hi"), "bundle")


def tiny_lora_and_batch():
    """(tiny-llm with a fresh LoRA adapter, a padded batch of three colour answers)."""
    from headstart.llm.model import add_lora, load_lm
    from headstart.llm.tokenize import encode_chat, pad_batch

    model, tokenizer, _ = load_lm("tiny-llm")
    rows = [encode_chat(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 96)
            for q, a in list(ANSWERS.items())[:3]]
    return add_lora(model, r=4), pad_batch(rows, tokenizer.pad_token_id)


def test_answer_loss_equals_the_models_own_loss():
    from headstart.llm.train import answer_loss

    peft_model, batch = tiny_lora_and_batch()
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(peft_model, batch), peft_model(**batch).loss, atol=1e-5, rtol=1e-5)
