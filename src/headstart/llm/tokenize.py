"""Token ids and loss labels for chat examples, padding, packing and length-grouped batching.

Labels follow the transformers convention: they are NOT shifted (`labels[i] == input_ids[i]` on a
trained token; the model shifts inside its loss), and `IGNORE` (-100) marks tokens outside the loss.
Only assistant answers are trained, each together with its end-of-turn marker (`<|im_end|>` in
ChatML) so the model learns to stop; system/user text and the `<|im_start|>assistant\\n` header are not.

Spans are found on characters, not tokens: the conversation is rendered once with the tokenizer's
chat template, every assistant answer is located by rendering the prefixes of the conversation,
and the text is tokenized once with offsets. No assumption is made about how the template's
pieces tokenize on their own (BPE merges across a boundary are handled by the offsets).

>>> row = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
>>> tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE])
'Hello<|im_end|>'
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.errors import ConfigError
from .data import PreferenceExample

IGNORE = -100
TRAIN_ON = ("assistant", "last", "all")

END_OF_TURN = "<|im_end|>"
"""ChatML's end-of-turn marker: generation stops on it, training labels it with each answer."""

# The one fallback for a tokenizer with no chat template of its own (plain base LMs): ChatML, as SmolLM2.
# Training needs explicit roles and an end-of-turn marker (to find the answer spans and to learn to stop),
# so generation and scoring use the same markup: a model is prompted as it was trained, never differently.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer brings its own chat template (else `render_chat` falls back to ChatML)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: str | list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text: the one renderer for training, generation and label scoring.

    Uses the tokenizer's chat template, or ChatML (`CHATML_TEMPLATE`) when it has none. A plain string
    is one user message. `add_generation_prompt=True` ends with the opened assistant turn.

    >>> render_chat(tokenizer, "Hi", add_generation_prompt=True)
    '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    extra = {} if has_chat_template(tokenizer) else {"chat_template": CHATML_TEMPLATE}
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)


def encode_chat(tokenizer: Any, messages: list[dict], max_length: int = 1024,
                train_on: str = "assistant") -> dict[str, list[int]]:
    """{"input_ids", "labels"} of a whole conversation, cut to its first `max_length` tokens.

    `train_on`: `assistant` (every assistant answer + its end-of-turn marker), `last` (the last
    assistant answer only, as DPO scores it) or `all` (every token). When truncation removes every
    trained token the labels are all `IGNORE`; callers skip such rows.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    text = render_chat(tokenizer, messages)
    if train_on == "all":
        ids = _encode(tokenizer, text)[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = _assistant_spans(tokenizer, messages, text, turns)
    ids, labels = _encode_with_spans(tokenizer, text, spans)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the prompt followed by the assistant header (`add_generation_prompt=True`)."""
    return _encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


def encode_preference(tokenizer: Any, ex: PreferenceExample, max_length: int = 1024) -> dict[str, dict[str, list[int]]]:
    """{"chosen": row, "rejected": row}: prompt + each answer, only that final answer labelled."""
    return {
        key: encode_chat(tokenizer, ex.prompt + [{"role": "assistant", "content": answer}], max_length, train_on="last")
        for key, answer in (("chosen", ex.chosen), ("rejected", ex.rejected))
    }


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: input_ids (pad_id), attention_mask (0 on padding), labels (IGNORE).

    A row without "labels" is trained on every token. `pad_id=None` pads with 0 (the attention
    mask and IGNORE labels make the padding value irrelevant).
    """
    if not rows:
        raise ValueError("pad_batch needs at least one row")
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), 0 if pad_id is None else int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        ids = row["input_ids"]
        lab = row.get("labels", ids)
        if len(lab) != len(ids):
            raise ValueError(f"row {b}: {len(ids)} input_ids but {len(lab)} labels")
        n = len(ids)
        if n:
            input_ids[b, :n] = torch.as_tensor(ids, dtype=torch.long)
            labels[b, :n] = torch.as_tensor(lab, dtype=torch.long)
            attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(rows: list[dict], block_size: int, eos_id: int) -> list[dict[str, list[int]]]:
    """Concatenate rows and cut the stream into `block_size` chunks (the last, shorter one kept).

    Labels stay with their tokens. A row that does not contain `eos_id` (no chat template ending
    its turns with it) is followed by an `eos_id` separator labelled IGNORE. Chunks are plain
    causal sequences: a token may attend to the end of the previous example in its chunk.
    Chunks with no trained token at all are dropped (they add nothing to the loss, and a batch
    of only such chunks would have an undefined mean loss).
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        row_ids = list(row["input_ids"])
        row_labels = list(row.get("labels", row_ids))
        ids += row_ids
        labels += row_labels
        if eos_id is not None and eos_id not in row_ids:
            ids.append(eos_id)
            labels.append(IGNORE)
    chunks = []
    for start in range(0, len(ids), block_size):
        chunk_labels = labels[start:start + block_size]
        if any(label != IGNORE for label in chunk_labels):
            chunks.append({"input_ids": ids[start:start + block_size], "labels": chunk_labels})
    return chunks


# ---- internals ---------------------------------------------------------------------------

def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assistant_spans(tokenizer: Any, messages: list[dict], text: str, turns: list[int]) -> list[tuple[int, int]]:
    """Character spans [start, end) in `text` of each assistant answer in `turns` plus its end-of-turn marker."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i in turns:
        content = messages[i]["content"]
        upto = render_chat(tokenizer, messages[: i + 1])
        span = None
        if text.startswith(upto):
            start = -1
            if i > 0:  # the answer starts right after the rendered prompt + assistant header
                head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
                if upto.startswith(head) and upto.startswith(content, len(head)):
                    start = len(head)
            if start < 0:  # the turn ends with the answer and its end-of-turn marker
                start = _rfind(upto, content, cursor)
            if start >= 0:
                found = content if upto.startswith(content, start) else content.strip()
                # answer + whatever the template closes the turn with, less the trailing newline(s)
                span = (start, max(start + len(found), len(upto.rstrip())))
        else:  # a template that renders a turn differently when it is not the last one
            start = _rfind(text, content, cursor, first=True)
            if start >= 0:
                found = content if text.startswith(content, start) else content.strip()
                end = start + len(found)
                eos = getattr(tokenizer, "eos_token", None)
                if eos and text.startswith(eos, end):
                    end += len(eos)
                span = (start, end)
        if span is not None and span[1] > span[0]:
            spans.append(span)
            cursor = span[1]
    return spans


def _rfind(haystack: str, content: str, cursor: int, first: bool = False) -> int:
    """Position of `content` (or its stripped form, for templates that trim) at or after `cursor`."""
    for needle in (content, content.strip()):
        if needle:
            pos = haystack.find(needle, cursor) if first else haystack.rfind(needle, cursor)
            if pos >= 0:
                return pos
    return -1


def _encode_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize `text` once; label the tokens that start inside a span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE] * len(ids)
        k = 0
        for t, (start, _end) in enumerate(enc["offset_mapping"]):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k < len(spans) and spans[k][0] <= start < spans[k][1]:
                labels[t] = ids[t]
        return ids, labels
    # Slow tokenizers have no offsets: tokenize the pieces between span boundaries separately.
    ids, labels = [], []
    cuts = [0] + [c for span in spans for c in span] + [len(text)]
    for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
        piece = _encode(tokenizer, text[a:b]) if b > a else []
        ids += piece
        labels += piece if n % 2 == 1 else [IGNORE] * len(piece)
    return ids, labels
