"""One answer produced a token per call, with its own KV cache and its own random generator.

`generate` (llm/generate.py) runs a whole answer in one `model.generate` call. A server that wants
several answers on one model to advance together (token by token, in turns) needs each answer as a
resumable state instead: `StepDecoder` is that state. Its sampling is transformers' own maths (the
same logits processors `model.generate` builds, in the same order), so greedy decoding gives the
tokens `generate(..., temperature=0)` gives, and a seed gives the answer `generate` gives with it,
whatever other decoders run between its steps.

>>> lm, tokenizer, _ = load_lm("tiny-llm")
>>> decoder = StepDecoder(lm.eval(), tokenizer, "Hello", max_new_tokens=8, temperature=0)
>>> while not decoder.done:
...     decoder.step()
>>> decoder.answer() == generate(lm, tokenizer, "Hello", max_new_tokens=8, temperature=0)
True
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from .generate import _CallbackStreamer, _cut_at_marker, _marker_as_text, render_prompt, stop_token_ids
from .tokenize import END_OF_TURN

# model.generate samples with the model's generation-config top_k, else 50 (GenerationConfig's global
# default); `generate` never sets top_k, so neither do we.
DEFAULT_TOP_K = 50


class StepDecoder:
    """The state of one answer being generated: prompt + tokens so far, KV cache, sampler, streamer.

    Options are `generate`'s, with its defaults. The first `step()` reads the prompt (prefill) and
    picks the first token; each later one feeds the last token and picks the next. `done` turns True
    on a stop token (eos or `<|im_end|>`), on the end-of-turn marker written as text (vocabularies
    without it as a token), or after `max_new_tokens`. `stream` receives the text pieces as
    `generate`'s does; they concatenate to `answer()`.

    The model runs as it is: put it in eval mode first (a served specialist is). Steps of different
    decoders may interleave on one model; the caller makes each step exclusive (a PEFT model's active
    adapter is shared state: select this decoder's before its step).

    >>> decoder = StepDecoder(lm.eval(), tokenizer, [{"role": "user", "content": "Hi"}], seed=3)
    >>> while not decoder.done:
    ...     decoder.step()
    """

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: str | list[dict], *, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, repetition_penalty: float = 1.1,
                 seed: int | None = 0, stream: Callable[[str], None] | None = None) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        text = render_prompt(tokenizer, prompt)
        self.prompt_ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not self.prompt_ids:
            raise ValueError("the rendered prompt has no tokens")
        self.new_ids: list[int] = []
        """The tokens picked so far (a final stop token included)."""
        self.stops = stop_token_ids(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            (self.stops[0] if self.stops else 0)
        self.cut_marker = _marker_as_text(tokenizer)
        self.sampling = temperature > 0
        top_k = getattr(getattr(inner_model(model), "generation_config", None), "top_k", None)
        self.processors = _logits_processors(float(temperature), float(top_p), float(repetition_penalty),
                                             DEFAULT_TOP_K if top_k is None else int(top_k))
        # Sampling draws from this generator only: same seed, same answer, whatever runs beside it.
        # seed None: its seed is drawn from the global RNG (`generate` then samples from that RNG).
        self.rng = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))
        self.streamer = _CallbackStreamer(tokenizer, stream, self.cut_marker) if stream is not None else None
        self.cache = None
        self.done = False

    @property
    def prefilled(self) -> bool:
        """True once the prompt is in the cache (later steps feed one token: they can run batched)."""
        return self.cache is not None

    @property
    def cached_positions(self) -> int:
        """Positions in the KV cache before the next step's token (prompt + every picked token but the last)."""
        return len(self.prompt_ids) + len(self.new_ids) - 1

    def step(self) -> int:
        """Run the model once (the whole prompt on the first call, else the last token) and pick the next
        token; returns it. Calling it once `done` is an error."""
        self.check_can_step()
        with torch.inference_mode():
            if self.cache is None:
                from transformers import DynamicCache

                self.cache = DynamicCache(config=model_config(self.model))
                fed = self.prompt_ids
                if self.streamer is not None:
                    self.streamer.put(torch.tensor(self.prompt_ids))  # skipped: the streamer wants the answer only
            else:
                fed = self.new_ids[-1:]
            ids = torch.tensor([fed])                                  # [1, new positions]
            seen = len(self.prompt_ids) + len(self.new_ids)            # positions in the cache after this call
            out = self.model(input_ids=ids, attention_mask=torch.ones(1, seen, dtype=torch.long), use_cache=True,
                             logits_to_keep=1, **{cache_kwarg(self.model): self.cache})
            return self.take(out.logits[:, -1])

    def check_can_step(self) -> None:
        if self.done:
            raise RuntimeError("this answer is finished: step() after done")
        if self.model.training:
            raise RuntimeError("StepDecoder runs an eval-mode model (dropout would make answers random): "
                               "call model.eval() first")

    def take(self, logits: torch.Tensor) -> int:
        """Pick the next token from the model's last-position logits [1, vocab] (its own run, or its row of a
        batched one, llm/decode_batch.py), stream it and update `done`; returns it."""
        with torch.inference_mode():
            every = torch.tensor([self.prompt_ids + self.new_ids])     # the penalty looks at the prompt too
            scores = self.processors(every, logits.to(dtype=torch.float32))
            if self.sampling:
                token = int(torch.multinomial(scores.softmax(-1), num_samples=1, generator=self.rng)[0, 0])
            else:
                token = int(scores.argmax(-1)[0])
        self.new_ids.append(token)
        self.done = token in self.stops or len(self.new_ids) >= self.max_new_tokens or self._marker_written()
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
            if self.done:
                self.streamer.end()
        return token

    def _marker_written(self) -> bool:
        # model.generate's stop_strings=[END_OF_TURN] for the marker-as-text case: stop once it is in the text
        return self.cut_marker and END_OF_TURN in self.tokenizer.decode(self.new_ids, skip_special_tokens=True)

    def answer(self) -> str:
        """The answer so far, as `generate` returns it: no trailing stop or pad token, no end-of-turn marker."""
        new = list(self.new_ids)
        while new and (new[-1] in self.stops or new[-1] == self.pad):
            new.pop()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return _cut_at_marker(text, final=True) if self.cut_marker else text


def _logits_processors(temperature: float, top_p: float, repetition_penalty: float, top_k: int):
    """What model.generate applies for `generate`'s options, in its order: the repetition penalty, then
    (sampling only) temperature, top-k, top-p."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature > 0:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k != 0:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_config(model: nn.Module) -> Any:
    """The transformers config of `model` (under its PEFT wrapper, if any)."""
    return inner_model(model).config


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5 calls the cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(inner_model(model).forward).parameters else "past_key_values"
