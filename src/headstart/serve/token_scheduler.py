"""Answers being generated on one shared base take turns, one token each (as vLLM and LoRAX interleave).

Holding the base's lock for a whole answer makes the fourth of four concurrent chats wait for the
other three to end before its first token. Here each answer is a `StepDecoder` (llm/decode.py) and one
worker thread per base runs them in rounds under the base's lock (a classification batch on the same
base can run between two rounds): a new answer's prompt alone, then one token for every other answer
in one batched forward (llm/decode_batch.py; PEFT's per-row `adapter_names` when they use different
adapters), or one by one with `max_batch=1`. Each decoder has its own KV cache and random generator,
so its tokens do not depend on its neighbours.

>>> scheduler = scheduler_for(shared_base)
>>> scheduler.submit(Turn(decoder, AdapterSelection(spec), stop=threading.Event(), finished=print,
...                       adapter=spec.adapter_name))
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..llm.decode import StepDecoder
from ..llm.decode_batch import can_step_together, forward_together

DEFAULT_MAX_BATCH = 8
"""Answers stepped in one forward at most (SmolLM2-135M on 2 cores: 4 answers 2x the tokens/s of turns)."""


@dataclass
class Turn:
    """One answer in the rotation."""

    decoder: StepDecoder
    activate: Callable[[], None]
    """Selects this answer's adapter in the shared modules (called under the lock before each step)."""
    stop: threading.Event
    """Set when the client went away: the answer leaves the rotation at its next turn, without a step."""
    finished: Callable[[Exception | None], None]
    """Called once, from the worker thread: None when the answer ended (done or stopped), else the error."""
    adapter: str | None = None
    """Its adapter's name in the shared modules, so a batched step can run each row through its own;
    None: never batched, always stepped alone."""


class TokenScheduler:
    """The rotation of one base: `submit` adds an answer; a worker thread, alive while answers are
    active, runs rounds under `lock` (the base's) and drops the answers done, stopped or failed."""

    def __init__(self, lock: Any, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.lock = lock
        self.max_batch = max_batch
        self._active: list[Turn] = []
        self._changed = threading.Lock()
        self._worker: threading.Thread | None = None
        self.steps = 0
        """Tokens picked so far, batched or not (the tests and the benchmark read it)."""
        self.batched_forwards = 0
        """Forwards that stepped several answers at once."""

    @property
    def active(self) -> int:
        """Answers in the rotation now."""
        with self._changed:
            return len(self._active)

    def answering(self, adapter: str) -> bool:
        """Whether an answer through adapter `adapter` is in the rotation now."""
        with self._changed:
            return any(turn.adapter == adapter for turn in self._active)

    def wait_answered(self, adapter: str, poll_s: float = 0.05) -> None:
        """Return once no answer through `adapter` is in the rotation (each ends: max_new_tokens bounds it,
        and a client that leaves is dropped at its next turn)."""
        while self.answering(adapter):
            time.sleep(poll_s)

    def submit(self, turn: Turn) -> None:
        """Add `turn` to the rotation; its first step (the prompt's prefill) comes at its first turn."""
        with self._changed:
            self._active.append(turn)
            if self._worker is None:
                self._worker = threading.Thread(target=self._rotate, name="headstart-token-turns", daemon=True)
                self._worker.start()

    def _rotate(self) -> None:
        try:
            while True:
                with self._changed:
                    if not self._active:
                        self._worker = None  # under the same lock as submit's check: no answer is left unserved
                        return
                    turns = list(self._active)
                for turn in self._round(turns):
                    with self._changed:
                        self._active.remove(turn)
        except BaseException:  # a bug here must not leave later answers waiting on a dead worker
            with self._changed:
                self._worker = None
            raise

    def _round(self, turns: list[Turn]) -> list[Turn]:
        """One token for each of `turns` (a new one: its prompt and first token); returns those that left."""
        left = [t for t in turns if t.stop.is_set()]
        for turn in left:
            turn.finished(None)
        live = [t for t in turns if not t.stop.is_set()]
        ready = [t for t in live if t.decoder.prefilled and t.adapter is not None]
        alone = [t for t in live if t not in ready]
        if not can_step_together([t.decoder for t in ready]) or self.max_batch == 1:
            ready, alone = [], live
        for turn in alone:
            if self._step(turn):
                left.append(turn)
        for start in range(0, len(ready), self.max_batch):
            left += self._step_together(ready[start:start + self.max_batch])
        return left

    def _step(self, turn: Turn) -> bool:
        """One token of `turn`; True when it leaves the rotation (its `finished` called)."""
        try:
            with self.lock, torch.inference_mode():
                turn.activate()
                turn.decoder.step()
            self.steps += 1
        except Exception as e:  # handed to the answer's consumer; the other answers go on
            turn.finished(e)
            return True
        return self._ended(turn)

    def _step_together(self, turns: list[Turn]) -> list[Turn]:
        """One token for each of `turns` from one forward; returns those that left."""
        if len(turns) == 1:
            return [turns[0]] if self._step(turns[0]) else []
        names = [t.adapter for t in turns]
        try:
            with self.lock, torch.inference_mode():
                if len(set(names)) == 1:  # one adapter: selected as for a lone step, the same LoRA maths
                    turns[0].activate()
                    logits = forward_together([t.decoder for t in turns])
                else:
                    logits = forward_together([t.decoder for t in turns], adapter_names=names)
            self.batched_forwards += 1
        except Exception:  # step them alone: the failure goes to the answer it belongs to, not to all
            return [t for t in turns if self._step(t)]
        left = []
        for turn, row in zip(turns, logits):
            try:
                turn.decoder.take(row[None])  # streams its piece: may raise for a client that left
                self.steps += 1
            except Exception as e:
                turn.finished(e)
                left.append(turn)
                continue
            if self._ended(turn):
                left.append(turn)
        return left

    @staticmethod
    def _ended(turn: Turn) -> bool:
        if turn.decoder.done:
            turn.finished(None)
            return True
        return False


class AdapterSelection:
    """Selects a generator's adapter before its step: `spec._activate()`, unless every adapter layer of the
    shared modules already runs that adapter alone. PEFT's set_adapter walks all modules (6 ms on
    SmolLM2-135M, 15% of a 41 ms token); reading the layers' state costs 0.1 ms. Make one per answer: the
    layers are listed at its first step (an adapter injected into new modules later in that answer is
    not seen; any set_adapter or disable_adapter on the shared modules is).

    >>> Turn(decoder, AdapterSelection(spec), stop, finished)
    """

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self._layers: list[Any] | None = None

    def __call__(self) -> None:
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            self._layers = [m for m in self.spec.model.modules()
                            if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        name = self.spec.adapter_name
        if not all(layer.active_adapters == [name] and not layer.disable_adapters for layer in self._layers):
            self.spec._activate()


# One scheduler per shared base, kept beside it without touching it: keyed weakly by the base, holding
# only its lock, so a dropped base takes its scheduler with it.
_schedulers: "weakref.WeakKeyDictionary[Any, TokenScheduler]" = weakref.WeakKeyDictionary()
_schedulers_lock = threading.Lock()


def scheduler_for(base: Any) -> TokenScheduler:
    """The token scheduler of `base` (a pool.SharedBase), made on first use."""
    with _schedulers_lock:
        if base not in _schedulers:
            _schedulers[base] = TokenScheduler(base.lock)
        return _schedulers[base]
