"""Instruction/preference data loading, chat tokenization with answer-only labels, batching and DPO maths."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import headstart
from headstart.core.errors import DataError
from headstart.engine.batches import length_grouped_batches
from headstart.llm.data import (
    ChatExample,
    PreferenceExample,
    load_preference_examples,
    load_sft_examples,
    split_holdout,
)
from headstart.methods.dpo.maths import dpo_loss, sequence_logps
from headstart.llm.tokenize import (
    IGNORE,
    encode_chat,
    encode_preference,
    encode_prompt,
    pack_rows,
    pad_batch,
)


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return headstart.load_base("tiny-llm").tokenizer


def labelled_spans(tokenizer, row) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            assert label == token  # unshifted: the label is the token itself
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(s) for s in spans]


# ---- loading ------------------------------------------------------------------------------

def test_alpaca_rows_with_and_without_input_and_system(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "bonjour", "output": "hello", "system": "Be brief."},
        {"instruction": "Count.", "output": 3},  # no input field; numeric output becomes text
    ])
    examples, skipped = load_sft_examples(path)
    assert skipped == []
    assert examples[0] == ChatExample([{"role": "user", "content": "Add 2 and 3."},
                                       {"role": "assistant", "content": "5"}])
    assert examples[1].messages == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Translate.\n\nbonjour"},
                                    {"role": "assistant", "content": "hello"}]
    assert examples[2].messages[-1] == {"role": "assistant", "content": "3"}


def test_chat_sharegpt_and_prompt_completion_rows(tmp_path):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"}]
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": chat},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]},
        {"prompt": "Q?", "completion": "A."},
        {"prompt": [{"role": "user", "content": "Q2?"}], "completion": "A2."},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "system": "Sys"},
    ])
    examples, skipped = load_sft_examples(path)
    assert skipped == []
    assert examples[0].messages == chat
    assert examples[1].messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]
    assert examples[2].messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert examples[3].messages == [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "A2."}]
    assert examples[4].messages[0] == {"role": "system", "content": "Sys"}


def test_json_list_file_and_jsonl_saved_as_json(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, 7]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    examples, skipped = load_sft_examples(tmp_path / "list.json")
    assert [e.messages[-1]["content"] for e in examples] == ["b", "d"]
    assert skipped == [("list.json:[3]", "not a JSON object (a int)")]
    write_jsonl(tmp_path / "lines.json", rows[:2])
    examples, skipped = load_sft_examples(tmp_path / "lines.json")
    assert len(examples) == 2 and skipped == []


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "output": "fine"},                                     # 1
        "{not json",                                                                 # 2
        "[1, 2]",                                                                    # 3
        {"text": "plain"},                                                           # 4
        {"instruction": "q", "input": "", "output": "  "},                           # 5
        {"messages": [{"role": "user", "content": "u"}]},                            # 6
        {"messages": [{"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}]},  # 7
        {"prompt": "p", "completion": ""},                                           # 8
        "",                                                                          # 9 (blank: not a row)
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": None}]},  # 10
        {"instruction": "", "output": "x"},                                          # 11
    ])
    examples, skipped = load_sft_examples(path)
    assert len(examples) == 1
    refs = [ref for ref, _ in skipped]
    assert refs == [f"bad.jsonl:{i}" for i in (2, 3, 4, 5, 6, 7, 8, 10, 11)]
    reasons = dict(skipped)
    assert reasons["bad.jsonl:2"].startswith("not JSON")
    assert reasons["bad.jsonl:3"] == "not a JSON object (a list)"
    assert reasons["bad.jsonl:4"] == "no known row shape (keys: text)"
    assert reasons["bad.jsonl:5"] == "empty output"
    assert reasons["bad.jsonl:6"] == "messages has no non-empty assistant turn"
    assert "role 'tool'" in reasons["bad.jsonl:7"]
    assert reasons["bad.jsonl:8"] == "empty completion"
    assert "no text content" in reasons["bad.jsonl:10"]
    assert reasons["bad.jsonl:11"] == "empty instruction"


def test_missing_empty_and_unusable_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sft_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="folder"):
        load_sft_examples(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows.*alpaca.*messages.*prompt/completion"):
        load_sft_examples(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "junk.jsonl", [{"text": "a", "label": "b"}, "oops"])
    with pytest.raises(DataError, match=r"none of its 2 rows.*junk.jsonl:1: no known row shape.*alpaca"):
        load_sft_examples(tmp_path / "junk.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_sft_examples(tmp_path / "latin1.jsonl")
    write_jsonl(tmp_path / "p.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="preference.*chosen"):
        load_preference_examples(tmp_path / "p.jsonl")


@pytest.mark.real
def test_real_alpaca_train_parses_completely(data_root):
    examples, skipped = load_sft_examples(data_root / "alpaca_en_demo" / "train.jsonl")
    assert (len(examples), len(skipped)) == (899, 0)
    assert examples[0].messages[0] == {"role": "user", "content": "Describe a process of making crepes."}
    assert all([m["role"] for m in e.messages] == ["user", "assistant"] for e in examples)


def test_preference_rows(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
         "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "c"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "r"}]},  # implicit prompt
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "", "rejected": "r"},
        {"prompt": "Q", "chosen": "c"},
        {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "c", "rejected": "r"},
        {"prompt": "Q", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
        "nope",
    ])
    examples, skipped = load_preference_examples(path)
    assert examples == [
        PreferenceExample([{"role": "user", "content": "Q?"}], "good", "bad"),
        PreferenceExample([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "yes", "no"),
        PreferenceExample([{"role": "user", "content": "Q"}], "c", "r"),
    ]
    assert [r for _, r in skipped][:5] == ["chosen and rejected are identical", "empty chosen", "no 'rejected' field",
                                           "prompt must end with a user turn, not assistant",
                                           "last message of chosen is a user turn, not the assistant answer"]
    assert skipped[5][1].startswith("not JSON")


def test_split_holdout_is_seeded_and_complete():
    items = list(range(50))
    train, held = split_holdout(items, 0.1, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # file order kept
    assert split_holdout(items, 0.1, seed=3) == (train, held)
    assert split_holdout(items, 0.1, seed=4) != (train, held)
    assert [len(p) for p in split_holdout([1, 2], 0.01)] == [1, 1]  # at least one held
    assert split_holdout([1], 0.5) == ([1], [])
    assert split_holdout(items, 0.0) == (items, [])


# ---- encode_chat ------------------------------------------------------------------------

def test_encode_chat_labels_exactly_the_answer_and_its_end_marker(tok):
    messages = [{"role": "system", "content": "SYSTEM TEXT"}, {"role": "user", "content": "USER TEXT"},
                {"role": "assistant", "content": "The answer, with ünïcode."}]
    row = encode_chat(tok, messages)
    assert len(row["input_ids"]) == len(row["labels"])
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    assert labelled_spans(tok, row) == ["The answer, with ünïcode.<|im_end|>"]
    # the prompt and the assistant header are exactly the unlabelled prefix
    prompt = encode_prompt(tok, messages[:2])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    n = len(prompt)
    assert row["input_ids"][:n] == prompt
    assert all(label == IGNORE for label in row["labels"][:n])
    assert row["labels"][n] != IGNORE
    assert row["labels"][-1] == IGNORE  # the trailing newline after <|im_end|>


def test_encode_chat_multi_turn_labels_every_answer(tok):
    messages = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second\nanswer "}]
    row = encode_chat(tok, messages)
    assert labelled_spans(tok, row) == ["first answer<|im_end|>", "second\nanswer <|im_end|>"]
    text = "".join(labelled_spans(tok, row))
    assert "question" not in text and "user" not in text and "assistant" not in text
    assert labelled_spans(tok, encode_chat(tok, messages, train_on="last")) == ["second\nanswer <|im_end|>"]
    everything = encode_chat(tok, messages, train_on="all")
    assert everything["labels"] == everything["input_ids"] == row["input_ids"]


def test_encode_chat_answer_repeating_the_question(tok):
    # content search must not latch onto an identical earlier user message
    messages = [{"role": "user", "content": "echo"}, {"role": "assistant", "content": "echo"},
                {"role": "user", "content": "echo"}, {"role": "assistant", "content": "echo"}]
    row = encode_chat(tok, messages)
    assert labelled_spans(tok, row) == ["echo<|im_end|>", "echo<|im_end|>"]
    # the labelled tokens sit in the assistant turns, not in the user turns
    ids = row["input_ids"]
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_encode_chat_truncation(tok):
    messages = [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a" * 40}]
    full = encode_chat(tok, messages)
    prompt_len = len(encode_prompt(tok, messages[:1]))
    cut = encode_chat(tok, messages, max_length=prompt_len + 10)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 10]  # start kept
    assert cut["labels"] == full["labels"][: prompt_len + 10]
    assert labelled_spans(tok, cut) == ["a" * 10]
    gone = encode_chat(tok, messages, max_length=prompt_len)
    assert len(gone["input_ids"]) == prompt_len and all(label == IGNORE for label in gone["labels"])


def test_encode_preference_labels_only_the_final_answer(tok):
    ex = PreferenceExample([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "earlier"},
                            {"role": "user", "content": "Q2"}], "good answer", "bad answer")
    pair = encode_preference(tok, ex)
    assert labelled_spans(tok, pair["chosen"]) == ["good answer<|im_end|>"]
    assert labelled_spans(tok, pair["rejected"]) == ["bad answer<|im_end|>"]
    prompt = encode_prompt(tok, ex.prompt)
    assert pair["chosen"]["input_ids"][: len(prompt)] == pair["rejected"]["input_ids"][: len(prompt)] == prompt


# ---- batching -----------------------------------------------------------------------------

def test_pad_batch_right_pads():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = pad_batch(rows, pad_id=2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long


def test_pack_rows_keeps_tokens_and_labels_in_order():
    rows = [{"input_ids": [1, 2, 3, 9], "labels": [IGNORE, 2, 3, 9]},    # ends with eos 9: no separator
            {"input_ids": [4, 5], "labels": [IGNORE, 5]},                 # no eos: separator added
            {"input_ids": [6, 7, 8], "labels": [IGNORE, IGNORE, 8]}]
    chunks = pack_rows(rows, block_size=4, eos_id=9)
    assert [c["input_ids"] for c in chunks] == [[1, 2, 3, 9], [4, 5, 9, 6], [7, 8, 9]]
    assert [c["labels"] for c in chunks] == [[IGNORE, 2, 3, 9], [IGNORE, 5, IGNORE, IGNORE], [IGNORE, 8, IGNORE]]
    assert all(len(c["input_ids"]) == len(c["labels"]) <= 4 for c in chunks)
    # a chunk without any trained token is dropped
    only_prompt = pack_rows([{"input_ids": [1, 2, 3, 4], "labels": [IGNORE] * 4}, rows[0]], block_size=4, eos_id=0)
    assert [c["input_ids"] for c in only_prompt] == [[0, 1, 2, 3], [9, 0]]  # [1, 2, 3, 4] dropped


def test_length_grouped_batches_cover_every_index_once_and_cut_padding():
    rng = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 20, (600,), generator=rng)]
    lengths[::10] = [int(x) for x in torch.randint(300, 500, (60,), generator=rng)]  # skewed: a few long ones
    batches = length_grouped_batches(lengths, batch_size=8, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(600))
    assert all(len(b) == 8 for b in batches)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
    assert length_grouped_batches(lengths, 8, seed=1) == batches
    assert length_grouped_batches(lengths, 8, seed=2) != batches

    def padded(bs):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(600, generator=gen).tolist()
    random_batches = [perm[i:i + 8] for i in range(0, 600, 8)]
    assert padded(batches) < 0.5 * padded(random_batches)
    # uneven sizes: only the tail may be short
    odd = length_grouped_batches(list(range(21)), batch_size=4, seed=0)
    assert sorted(len(b) for b in odd) == [1, 4, 4, 4, 4, 4] and sorted(i for b in odd for i in b) == list(range(21))
    assert length_grouped_batches([], 4, 0) == []


# ---- DPO maths ----------------------------------------------------------------------------

def test_sequence_logps_matches_a_hand_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 6], [IGNORE, 1, IGNORE, 0, 2]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(1, 5):
            if labels[b, t] != IGNORE:
                total += torch.log_softmax(logits[b, t - 1], dim=-1)[labels[b, t]].item()
        expected.append(total)
    assert torch.allclose(sequence_logps(logits, labels), torch.tensor(expected), atol=1e-5)
    # the first label is never scored (nothing predicts it)
    labels0 = labels.clone()
    labels0[:, 0] = 5
    assert torch.allclose(sequence_logps(logits, labels0), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(sequence_logps(logits.bfloat16(), labels),
                          sequence_logps(logits.bfloat16().float(), labels), atol=1e-5)


def test_sequence_logps_agrees_with_the_model_loss(tok):
    lm = headstart.load_base("tiny-llm").lm
    row = encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    batch = pad_batch([row], tok.pad_token_id)
    with torch.no_grad():
        out = lm(**batch)
    n = sum(label != IGNORE for label in row["labels"][1:])
    assert torch.allclose(-sequence_logps(out.logits, batch["labels"]) / n, out.loss, atol=1e-5)


def test_dpo_loss_against_hand_computation():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    beta = 0.5
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=beta)
    z = [beta * ((-10 + 12) - 0), beta * ((-4 + 3) - 0)]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-v)) for v in z) / 2, abs=1e-6)
    assert stats["reward_chosen"] == pytest.approx(beta * ((-10 + 11) + (-4 + 5)) / 2)
    assert stats["reward_rejected"] == pytest.approx(beta * ((-12 + 11) + (-3 + 5)) / 2)
    assert stats["reward_accuracy"] == pytest.approx(0.5)
    assert stats["margin"] == pytest.approx(stats["reward_chosen"] - stats["reward_rejected"])


def test_dpo_loss_is_log2_at_the_reference_and_pushes_chosen_up():
    ref_c, ref_r = torch.tensor([-7.0, -3.0, -9.0]), torch.tensor([-6.0, -8.0, -2.0])
    pc, pr = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
    loss, stats = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["reward_chosen"] == stats["reward_rejected"] == stats["margin"] == 0
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    # end to end through sequence_logps: one gradient step on the logits raises the chosen logp
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 5, 1, 3], [IGNORE, IGNORE, 7, 2, 8, 9]])  # row 0 chosen, 1 rejected
    ref = sequence_logps(logits.detach(), labels)
    logps = sequence_logps(logits, labels)
    loss, _ = dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:])
    loss.backward()
    with torch.no_grad():
        after = sequence_logps(logits - 1.0 * logits.grad, labels)
    assert after[0] > ref[0] and after[1] < ref[1]
