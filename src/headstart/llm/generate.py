"""Chat generation for a causal LM (plain, PEFT-wrapped or 4-bit), optionally streamed.

>>> lm, tokenizer, _ = load_lm("tiny-llm")
>>> generate(lm, tokenizer, "Hello", max_new_tokens=8, temperature=0)   # greedy
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .tokenize import END_OF_TURN, has_chat_template, render_chat


class _CallbackStreamer:
    """A transformers streamer that hands decoded text pieces of the answer to `callback`.

    It decodes the whole answer so far at each token and passes on what is new, holding back a
    trailing incomplete character (byte-level tokens can split one), so the pieces concatenate
    to exactly the decoded answer. The first `put` (the prompt) is skipped.
    """

    def __init__(self, tokenizer: Any, callback: Callable[[str], None], cut_marker: bool = False) -> None:
        self.tokenizer = tokenizer
        self.callback = callback
        self.cut_marker = cut_marker
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._emit(self.decode(), final=False)

    def end(self) -> None:
        self._emit(self.decode(), final=True)

    def decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _emit(self, text: str, *, final: bool) -> None:
        if self.cut_marker:  # the end-of-turn marker is text here: never hand out it or a start of it
            text = _cut_at_marker(text, final)
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece = text[len(self.sent):]
            self.sent = text
            self.callback(piece)


def _cut_at_marker(text: str, final: bool) -> str:
    """`text` up to END_OF_TURN; unless final, also without a trailing piece that may start it."""
    text = text.split(END_OF_TURN, 1)[0]
    if not final:
        for n in range(min(len(END_OF_TURN) - 1, len(text)), 0, -1):
            if END_OF_TURN.startswith(text[-n:]):
                return text[:-n]
    return text


def render_prompt(tokenizer: Any, prompt: str | list[dict]) -> str:
    """The prompt text the model sees: `render_chat` (the renderer training uses) with the assistant turn opened."""
    return render_chat(tokenizer, prompt, add_generation_prompt=True)


def _marker_as_text(tokenizer: Any) -> bool:
    """ChatML fallback on a vocabulary without an `<|im_end|>` token: the marker is plain text, so
    generation stops on the string and it is cut from the answer."""
    return not has_chat_template(tokenizer) and END_OF_TURN not in tokenizer.get_vocab()


def stop_token_ids(tokenizer: Any) -> list[int]:
    """tokenizer.eos_token_id and the id of `<|im_end|>` when the vocabulary has it."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    if END_OF_TURN in vocab and int(vocab[END_OF_TURN]) not in ids:
        ids.append(int(vocab[END_OF_TURN]))
    return ids


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    seed: int | None = 0,
    stream: Callable[[str], None] | None = None,
) -> str:
    """The model's answer to `prompt` (a user message or a list of chat messages).

    Sampling when `temperature > 0` (with `top_p`), greedy at 0; stops at the end of the turn
    (`eos` or `<|im_end|>`). `seed` makes sampling reproducible without touching the caller's
    RNG (None: use the global RNG). `stream` receives the answer's text pieces as they are
    produced; they concatenate to the returned text, which holds neither the prompt nor the
    end-of-turn token. Every module's train/eval mode is restored afterwards, and a 4-bit
    model comes back guarded with its weights untouched (see `model.bnb_cpu_inference`).
    """
    from .model import bnb_cpu_inference

    text = render_prompt(tokenizer, prompt)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    input_ids = enc["input_ids"]
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        eos_token_id=stops or None,
        pad_token_id=pad,
        use_cache=True,
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    cut_marker = _marker_as_text(tokenizer)
    if cut_marker:
        kwargs.update(stop_strings=[END_OF_TURN], tokenizer=tokenizer)
    streamer = _CallbackStreamer(tokenizer, stream, cut_marker) if stream is not None else None

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        # 4-bit layers: fast packed CPU layout during generation, restored exactly (and guarded) after
        with bnb_cpu_inference(model), torch.random.fork_rng(devices=[]), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs
            )
    finally:
        for m, training in modes.items():
            m.training = training
    new = out[0, input_ids.shape[1]:].tolist()
    while new and (new[-1] in stops or new[-1] == pad):
        new.pop()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    return _cut_at_marker(answer, final=True) if cut_marker else answer
