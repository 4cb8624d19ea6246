"""One chat renderer (`llm.tokenize.render_chat`) for training, generation and label scoring.

A hub LM without a chat template must be prompted at generation and scoring time exactly as SFT trained it;
before, the three paths fell back to three different formats (ChatML, newline-joined text, `Answer:` blocks).
"""
from __future__ import annotations

import pytest

import headstart
from headstart.bases.tiny import byte_tokenizer
from headstart.llm.generate import _CallbackStreamer, _cut_at_marker, _marker_as_text, render_prompt
from headstart.llm.tokenize import CHATML_TEMPLATE, encode_chat, render_chat
from headstart.methods.lm_scoring import LabelScoringModel, default_prompt_spec


@pytest.fixture(scope="module")
def templateless_llm():
    llm = headstart.load_base("tiny-llm")
    llm.tokenizer.chat_template = None  # a plain base LM from the hub
    return llm


def test_training_generation_and_scoring_prompts_agree_without_a_template(templateless_llm):
    tok = templateless_llm.tokenizer
    spec = default_prompt_spec(["food", "sport"], {}, [], "Pick a topic.", calibrate=False)
    user = spec.instruction + "\n" + "".join(f"- {line}\n" for line in spec.label_lines) + "Text: pizza"
    messages = [{"role": "user", "content": user}]

    trained = tok.decode(encode_chat(tok, messages + [{"role": "assistant", "content": "food"}])["input_ids"])
    generation_prompt = render_prompt(tok, messages)
    scoring_prompt = LabelScoringModel(templateless_llm, spec).prompt_text("pizza")

    assert generation_prompt == scoring_prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert trained == generation_prompt + "food<|im_end|>\n"  # what training labels follows the same prompt


def test_a_tokenizer_template_is_used_as_is(templateless_llm):
    tok = byte_tokenizer(["<s>"], bos_token="<s>", eos_token="<s>")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert render_chat(tok, "hi") == render_prompt(tok, "hi") == "[user] hi\n"
    tok.chat_template = None
    assert render_chat(tok, "hi") == tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                             chat_template=CHATML_TEMPLATE)


def test_end_of_turn_as_plain_text_is_cut_from_answers_and_streams():
    tok = byte_tokenizer(["<s>"], bos_token="<s>", eos_token="<s>")  # no <|im_end|> token, no template
    assert _marker_as_text(tok)
    assert _cut_at_marker("Paris.<|im_end|>\n<|im_start|>user", final=True) == "Paris."
    assert _cut_at_marker("Paris.<|im_e", final=False) == "Paris."  # may be the marker's start: held back
    assert _cut_at_marker("a < b", final=False) == "a < b"

    pieces: list[str] = []
    streamer = _CallbackStreamer(tok, pieces.append, cut_marker=True)
    streamer.put(tok("prompt", return_tensors="pt")["input_ids"])
    for char in "Paris.<|im_end|>\nmore":
        streamer.put(tok(char, return_tensors="pt", add_special_tokens=False)["input_ids"])
    streamer.end()
    assert "".join(pieces) == "Paris."


def test_generate_with_a_plain_text_end_marker_runs_and_never_returns_it(templateless_llm):
    from headstart.llm.generate import generate

    tok = byte_tokenizer(["<|endoftext|>"], unk_token="<|endoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")  # ids fit tiny-llm's vocabulary; no <|im_end|> token
    pieces: list[str] = []
    answer = generate(templateless_llm.lm, tok, "Hello", max_new_tokens=24, temperature=0, stream=pieces.append)
    assert "<|im_end|>" not in answer and "".join(pieces) == answer
