"""Answers being generated on one shared base take turns, one token each (as vLLM and LoRAX interleave).

Holding the base's lock for a whole answer makes the fourth of four concurrent chats wait for the
other three to end before its first token. Here each answer is a `StepDecoder` (llm/decode.py) and one
worker thread per base runs them round robin: a step each, under the base's lock (a classification
batch on the same base can run between two steps), this answer's adapter selected inside the lock.
Each decoder has its own KV cache and random generator, so its tokens do not depend on its neighbours.

>>> scheduler = scheduler_for(shared_base)
>>> scheduler.submit(Turn(decoder, spec._activate, stop=threading.Event(), finished=print))
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..llm.decode import StepDecoder


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


class TokenScheduler:
    """The rotation of one base: `submit` adds an answer; a worker thread, alive while answers are
    active, steps each in turn under `lock` (the base's) and drops those done, stopped or failed."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self._active: list[Turn] = []
        self._changed = threading.Lock()
        self._worker: threading.Thread | None = None
        self.steps = 0
        """Decode steps run so far (the tests and the benchmark read it)."""

    @property
    def active(self) -> int:
        """Answers in the rotation now."""
        with self._changed:
            return len(self._active)

    def submit(self, turn: Turn) -> None:
        """Add `turn` to the rotation; its first step (the prompt's prefill) comes at its first turn."""
        with self._changed:
            self._active.append(turn)
            if self._worker is None:
                self._worker = threading.Thread(target=self._rotate, name="headstart-token-turns", daemon=True)
                self._worker.start()

    def _rotate(self) -> None:
        while True:
            with self._changed:
                if not self._active:
                    self._worker = None  # under the same lock as submit's check: no answer is left unserved
                    return
                turns = list(self._active)
            for turn in turns:
                if self._step(turn):
                    with self._changed:
                        self._active.remove(turn)

    def _step(self, turn: Turn) -> bool:
        """One token of `turn`; True when it leaves the rotation (its `finished` called)."""
        if turn.stop.is_set():
            turn.finished(None)
            return True
        try:
            with self.lock, torch.inference_mode():
                turn.activate()
                turn.decoder.step()
            self.steps += 1
        except Exception as e:  # handed to the answer's consumer; the other answers go on
            turn.finished(e)
            return True
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
