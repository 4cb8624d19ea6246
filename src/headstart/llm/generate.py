"""Chat generation for a causal LM (plain, PEFT-wrapped or 4-bit), optionally streamed.

>>> lm, tokenizer, _ = load_lm("tiny-llm")
>>> generate(lm, tokenizer, "Hello", max_new_tokens=8, temperature=0)   # greedy
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

END_OF_TURN = "<|im_end|>"


class _CallbackStreamer:
    """A transformers streamer that hands decoded text pieces of the answer to `callback`.

    It decodes the whole answer so far at each token and passes on what is new, holding back a
    trailing incomplete character (byte-level tokens can split one), so the pieces concatenate
    to exactly the decoded answer. The first `put` (the prompt) is skipped.
    """

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.callback = callback
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
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece = text[len(self.sent):]
            self.sent = text
            self.callback(piece)


def _messages(prompt: str | list[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def render_prompt(tokenizer: Any, prompt: str | list[dict]) -> str:
    """The prompt text the model sees: the chat template with the assistant turn opened."""
    messages = _messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(str(m["content"]) for m in messages) + "\n"


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
    streamer = _CallbackStreamer(tokenizer, stream) if stream is not None else None

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
    return answer
