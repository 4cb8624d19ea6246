"""Causal-LM label scoring (`lm_scoring`) and the `incontext` method, on the tiny random `tiny-llm` base."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import headstart
from headstart.core.errors import ConfigError
from headstart.methods.incontext.method import sample_examples
from headstart.methods.lm_scoring import LabelScoringModel, PromptSpec, default_prompt_spec, interleave_by_class

CLASSES = ["food", "sport", "tech"]
DEMOS = [("pizza soup", 0), ("bread cheese", 0), ("goal match", 1), ("team coach", 1), ("laptop code", 2)]
TEXTS = ["pizza with cheese and soup", "the team scored a goal", "x", "my laptop compiler crashed today again"]


@pytest.fixture(scope="module")
def llm():
    return headstart.load_base("tiny-llm")


@pytest.fixture(scope="module")
def model(llm):
    spec = default_prompt_spec(CLASSES, {"tech": "computers and software"}, DEMOS, None, calibrate=True)
    return LabelScoringModel(llm, spec).eval()


def uncached_scores(model: LabelScoringModel, texts: list[str]) -> torch.Tensor:
    """The reference: each (input, class) as one full sequence, no KV cache, no padding."""
    lm = model.base.lm
    out = torch.zeros(len(texts), len(model.answer_ids))
    for b, text in enumerate(texts):
        batch = model.collate([text])
        inp = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        for c, answer in enumerate(model.answer_ids):
            seq = model.prefix_ids + inp + answer
            with torch.no_grad():
                logp = lm(input_ids=torch.tensor([seq]), use_cache=False).logits[0].log_softmax(-1)
            start = len(model.prefix_ids) + len(inp)
            out[b, c] = sum(logp[start - 1 + j, tok] for j, tok in enumerate(answer))
    return out


def test_cached_prefix_scores_equal_full_sequence_scores(model, llm):
    batch = model.collate(TEXTS)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # inputs of different lengths: padding is exercised
    model.calibration.zero_()
    scores = model(**batch)
    assert scores.shape == (len(TEXTS), len(CLASSES)) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, uncached_scores(model, TEXTS), atol=1e-4, rtol=0)
    # Answers of different lengths (the tree mask) and mean instead of sum.
    spec = PromptSpec(CLASSES, ["a", "much longer answer", "mid size"], CLASSES, "Pick one.", DEMOS[:2])
    normed = LabelScoringModel(llm, spec, length_norm=True)
    lengths = torch.tensor([len(a) for a in normed.answer_ids], dtype=torch.float32)
    expected = uncached_scores(normed, TEXTS) / lengths
    torch.testing.assert_close(normed(**normed.collate(TEXTS)), expected, atol=1e-4, rtol=0)


def test_batch_size_does_not_change_scores(model, monkeypatch):
    model.calibration.zero_()
    whole = model(**model.collate(TEXTS))
    monkeypatch.setattr(model, "batch_size", 3)
    torch.testing.assert_close(model(**model.collate(TEXTS)), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(**model.collate(TEXTS[2:3])), whole[2:3], atol=1e-5, rtol=0)


def test_calibration_shifts_scores_by_a_per_class_constant(model):
    model.calibration.zero_()
    raw = model(**model.collate(TEXTS))
    model.calibrate_()
    assert model.calibration.abs().sum() > 0
    diff = model(**model.collate(TEXTS)) - raw
    torch.testing.assert_close(diff, model.calibration.expand_as(diff), atol=1e-5, rtol=0)
    # Content-free inputs come out (close to) uniform once calibrated: that is the point of it.
    cf = model(**model.collate(["N/A", "", "[MASK]"])).softmax(-1).mean(0)
    torch.testing.assert_close(cf, torch.full((3,), 1 / 3), atol=1e-4, rtol=0)


def test_no_calibration_when_disabled(llm):
    spec = default_prompt_spec(CLASSES, {}, [], "Pick a topic.", calibrate=False)
    model = LabelScoringModel(llm, spec)
    model.calibrate_()
    assert torch.count_nonzero(model.calibration) == 0
    assert not any(p.requires_grad for p in model.parameters())


def test_prompt_holds_instruction_labels_demonstrations_and_input(model):
    text = model.prompt_text("the final input")
    assert text.startswith("<|im_start|>user\nClassify")
    assert "- food\n" in text and "- tech: computers and software\n" in text
    assert all(f"Text: {t}<|im_end|>" in text for t, _ in DEMOS)
    assert text.count("- food") == 1  # the label list is not repeated per demonstration
    assert text.endswith("Text: the final input<|im_end|>\n<|im_start|>assistant\n")
    assert model.answer_ids[0][-1] == model.base.tokenizer.eos_token_id  # answers end with <|im_end|>
    assert model.prompt_tokens == len(model.prefix_ids) > 0


def test_demonstrations_interleave_classes():
    order = [y for _, y in interleave_by_class(DEMOS, seed=0)]
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:]) == [0, 1]
    assert interleave_by_class(DEMOS, seed=0) == interleave_by_class(DEMOS, seed=0)


def test_inputs_are_truncated_and_overlong_prompts_refused(llm):
    spec = PromptSpec(CLASSES, CLASSES, CLASSES, "Pick one.", max_input_chars=5)
    model = LabelScoringModel(llm, spec)
    assert "Text: abcde<|im_end|>" in model.prompt_text("abcdefghij")
    many = [("word " * 150, i % 3) for i in range(6)]  # ~900 tokens each, tiny-llm has 512 positions
    with pytest.raises(ConfigError, match="at most 512"):
        LabelScoringModel(llm, default_prompt_spec(CLASSES, {}, many, None, True))


def test_prompt_spec_json_round_trip():
    spec = default_prompt_spec(CLASSES, {"food": "meals"}, DEMOS, None, calibrate=False)
    again = PromptSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec


def test_sampled_demonstrations_depend_only_on_the_seed():
    labels = [i % 3 for i in range(30)]
    assert sample_examples(labels, 3, 2, seed=1) == sample_examples(labels, 3, 2, seed=1)
    assert sample_examples(labels, 3, 2, seed=1) != sample_examples(labels, 3, 2, seed=2)
    assert len(sample_examples(labels[:4], 3, 2, seed=0)) == 4  # class 1 and 2 have fewer: all of them used


def test_incontext_fit_save_load(tiny_text_csv, tmp_path):
    out = tmp_path / "bundle"
    # A short instruction: tiny-llm's byte-level tokenizer and 512 positions leave little room for 6 demonstrations.
    spec = headstart.fit(tiny_text_csv, base="tiny-llm", method="incontext", examples_per_class=2, instruction="Topic?",
                         label_text=["tech=computers"], progress=False, out=out, log=lambda _: None)
    assert (out / "prompt.json").is_file()
    assert set(load_file(out / "trained.safetensors")) == {"calibration"}
    prompt = json.loads((out / "prompt.json").read_text())
    assert len(prompt["examples"]) == 6 and prompt["classes"] == list(CLASSES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["config"]["label_text"] == ["tech=computers"]
    assert manifest["method"]["config"]["answer_word"] == []
    assert manifest["details"]["examples_used"] == 6 and manifest["metrics"]["trainable_params"] == 0
    loaded = headstart.load(out)
    torch.testing.assert_close(loaded.predict_proba(TEXTS), spec.predict_proba(TEXTS), atol=1e-5, rtol=0)
    # Same seed, same demonstrations.
    again = headstart.fit(tiny_text_csv, base="tiny-llm", method="incontext", examples_per_class=2,
                          instruction="Topic?", progress=False, log=lambda _: None)
    assert again.model.spec.examples == spec.model.spec.examples


def test_incontext_answer_words_are_what_demonstrations_answer_and_what_is_scored(tiny_text_csv, tmp_path):
    out = tmp_path / "bundle"
    spec = headstart.fit(tiny_text_csv, base="tiny-llm", method="incontext", examples_per_class=1, instruction="Topic?",
                         answer_word=["tech=computing"], progress=False, out=out, log=lambda _: None)
    assert spec.model.spec.answers == ["food", "sport", "computing"]
    assert "computing" in spec.model.prompt_text("x") and "tech" not in spec.model.prompt_text("x")
    loaded = headstart.load(out)
    assert loaded.model.spec.answers == ["food", "sport", "computing"]  # from prompt.json
    assert set(loaded.predict(TEXTS)) <= set(CLASSES)  # predictions are the labels, not the answer words


def test_incontext_needs_a_causal_lm(tiny_text_csv):
    with pytest.raises(ConfigError, match="causal LM"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="incontext", progress=False, log=lambda _: None)
