"""One served specialist: its facts, and the async calls the routers make (classify, embed, stream).

Classification and embeddings go through a `MicroBatcher` each, so concurrent requests to one
specialist share forward passes; answers being generated on one base take turns a token at a time
(`token_scheduler`) and hand their text pieces to the event loop as they come.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from ..core.errors import HeadstartError
from ..llm.decode import StepDecoder
from .batching import MicroBatcher
from .errors import ApiError
from .limits import Limits
from .pool import BasePool, ClassifierRunner
from .token_scheduler import AdapterSelection, Turn, scheduler_for

GENERATION_OPTIONS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")
HEADLINE_METRICS = ("accuracy", "macro_f1", "split", "examples", "eval_loss", "eval_perplexity", "loss",
                    "perplexity")


class _Stopped(Exception):
    """Raised inside a generation's stream callback when its client went away."""


class Served:
    """A specialist as the server sees it. Build with `Served.load`; routers use the attributes below."""

    def __init__(self, specialist_id: str, folder: Path, manifest: dict[str, Any], limits: Limits):
        from ..bundle.commands import pipeline_task

        self.id = specialist_id
        self.folder = folder
        self.manifest = manifest
        self.kind = manifest["kind"]
        """"classifier" or "generator"."""
        self.task = pipeline_task(manifest)
        """"text-classification", "image-classification" or "text-generation"."""
        card = folder / "README.md"
        self.card = card.read_text(errors="replace") if card.is_file() else ""
        self.limits = limits
        self.head: str | None = None
        """The head (task) served, for a bundle with a head per task; None: its only or default head."""
        self.runner: ClassifierRunner | None = None
        self.generator = None
        self._generator_base = None
        self._classify_batcher: MicroBatcher | None = None
        self._embed_batcher: MicroBatcher | None = None

    @classmethod
    def load(cls, specialist_id: str, folder: Path, pool: BasePool, limits: Limits, max_batch: int = 32,
             max_wait_s: float = 0.005, head: str | None = None) -> "Served":
        """Load the bundle `folder` onto the pool's shared bases (`head`: one head of a head-per-task bundle)."""
        from ..bundle.format import read_manifest

        manifest = read_manifest(folder)
        served = cls(specialist_id, folder, manifest, limits)
        served.head = head
        if served.kind == "generator":
            served.generator, served._generator_base = pool.generator(folder, manifest)
        else:
            served.runner = runner = pool.classifier(folder, manifest, head)
            if runner.shares in ("head", "lora"):  # batched with every specialist sharing its base
                if runner.base.batcher is None:
                    runner.base.batcher = MicroBatcher(runner.base.classify_shared, max_batch, max_wait_s)
                served._classify_batcher = runner.base.batcher
            else:
                served._classify_batcher = MicroBatcher(runner.probabilities, max_batch, max_wait_s)
            served._embed_batcher = MicroBatcher(served.runner.features, max_batch, max_wait_s)
        return served

    @classmethod
    def describe(cls, specialist_id: str, folder: Path, limits: Limits, head: str | None = None) -> "Served":
        """The specialist as its manifest tells it, nothing loaded (no base, no adapter, no head): what a
        listing needs. Its `facts`, `manifest` and `card` are those of the loaded one; it cannot answer."""
        from ..bundle.format import read_manifest

        served = cls(specialist_id, folder, read_manifest(folder), limits)
        served.head = head
        return served

    # ---- facts ------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        if self.runner is not None:
            return list(self.runner.classes)
        if self.kind == "generator":
            return []
        from ..bundle.classifier import pick_head

        try:  # described, not loaded: the manifest's classes of the head served
            return list(self.manifest["classes"]) if "heads" not in self.manifest \
                else pick_head(self.folder, self.manifest, self.head)[1]
        except (HeadstartError, KeyError):
            return []

    def _shares(self) -> str:
        if self.runner is not None:
            return self.runner.shares
        if self.kind == "generator":
            return "generator"
        from .pool import _sharing

        return _sharing(self.folder, self.manifest)

    def facts(self) -> dict[str, Any]:
        """JSON-able: id, task, kind, base, method, labels, headline metrics."""
        base = self.manifest["base"]
        metrics = self.manifest.get("metrics", {})
        return {"id": self.id, "task": self.task, "kind": self.kind,
                "base": {"name": base.get("name"), "kind": base.get("kind"), "params": base.get("params")},
                "method": self.manifest["method"]["name"], "labels": self.labels,
                "metrics": {k: metrics[k] for k in HEADLINE_METRICS if k in metrics},
                "shares_base": self._shares(),
                "created": self.manifest.get("created"), **({"head": self.head} if self.head else {})}

    def details(self) -> dict[str, Any]:
        """`facts` + every metric (without the confusion matrix's bulk) + the model card."""
        metrics = {k: v for k, v in self.manifest.get("metrics", {}).items() if k != "confusion"}
        return {**self.facts(), "metrics": metrics, "card": self.card,
                "method_config": self.manifest["method"].get("config", {})}

    # ---- classification and embeddings ------------------------------------------------------
    def _need(self, what: str) -> None:
        if self.runner is None:
            raise ApiError(400, "wrong_task", f"{self.id} is a {self.task} specialist: it cannot {what} "
                                              "(use /v1/completions or /v1/chat/completions)")

    async def classify(self, inputs: list[Any], top_k: int = 1) -> list[list[dict[str, Any]]]:
        """Top-k labels with scores for each input (a string for text, a PIL image for images)."""
        self._need("classify")
        want = str if self.task == "text-classification" else _pil_image_type()
        if not all(isinstance(x, want) for x in inputs):
            raise ApiError(422, "invalid_input", f"{self.id} ({self.task}) takes "
                                                 f"{'texts' if want is str else 'images'}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ApiError(422, "invalid_parameter", f"top_k must be a whole number of at least 1, got {top_k!r}")
        self.limits.check_batch(inputs)
        if self.runner.shares in ("head", "lora"):
            inputs = [(self.runner, x) for x in inputs]
        rows = await self.limits.within_time(self._classify_batcher.submit(inputs))
        k = min(top_k, len(self.runner.classes))
        out = []
        for probs in rows:
            top = probs.topk(k)
            out.append([{"label": self.runner.classes[i], "score": float(s)}
                        for s, i in zip(top.values.tolist(), top.indices.tolist())])
        return out

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """The features the specialist's head reads, one vector per text (text classifiers only)."""
        self._need("embed")
        if self.task != "text-classification":
            raise ApiError(400, "wrong_task", f"{self.id} is an {self.task} specialist: embeddings are for text")
        texts = self.limits.check_texts(texts)
        rows = await self.limits.within_time(self._embed_batcher.submit(texts))
        return [row.tolist() for row in rows]

    # ---- generation -------------------------------------------------------------------------
    def _generation_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(GENERATION_OPTIONS))
        if unknown:
            raise ApiError(422, "invalid_parameter", f"unknown generation option(s): {', '.join(unknown)}")
        out = {k: v for k, v in options.items() if v is not None}
        for key, value in out.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ApiError(422, "invalid_parameter", f"{key} must be a number")
        if "max_new_tokens" in out:
            if int(out["max_new_tokens"]) < 1:
                raise ApiError(422, "invalid_parameter", "max_new_tokens must be at least 1")
            out["max_new_tokens"] = min(int(out["max_new_tokens"]), self.limits.max_new_tokens)
        else:
            out["max_new_tokens"] = min(256, self.limits.max_new_tokens)
        if "seed" in out:
            out["seed"] = int(out["seed"])
        if out.get("temperature", 0) < 0 or not 0 < out.get("top_p", 1) <= 1:
            raise ApiError(422, "invalid_parameter", "need temperature >= 0 and 0 < top_p <= 1")
        return out

    def _check_prompt(self, prompt: Any) -> Any:
        if isinstance(prompt, str):
            self.limits.check_texts(prompt)
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(422, "invalid_input", "a prompt is a string or a non-empty list of chat messages")
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ApiError(422, "invalid_input", f"message {i} needs a role (system, user, assistant) "
                                                     "and a string content")
        if sum(len(m["content"]) for m in prompt) > self.limits.max_text_chars:
            raise ApiError(413, "text_too_long", f"the messages exceed {self.limits.max_text_chars} characters")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]

    def stream(self, prompt: Any, **options: Any) -> AsyncIterator[str]:
        """The answer's text pieces as they are produced (a string prompt or chat messages). The prompt
        and options are checked now (an ApiError before any piece), the generation starts when iterated."""
        if self.generator is None:
            raise ApiError(400, "wrong_task", f"{self.id} is a {self.task} specialist: it does not generate "
                                              f"(use /models/{self.id}/predict)")
        return self._pieces(self._check_prompt(prompt), self._generation_options(options))

    async def _pieces(self, prompt: Any, options: dict[str, Any]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down): stop generating
                stop.set()

        def piece(text: str) -> None:
            if stop.is_set():
                raise _Stopped()
            put(text)

        def finished(error: Exception | None) -> None:
            if error is None:
                put(done)
            elif not isinstance(error, _Stopped):  # handed to the consumer, which re-raises it in the request
                put(error)

        def whole_answer() -> None:
            try:
                self._generator_base.exclusive(lambda: self.generator.generate(prompt, stream=piece, **options))
                finished(None)
            except Exception as e:
                finished(e)

        task = None
        if self.generator.method == "qlora":
            # A QLoRA generator has its own 4-bit base, switched to the packed CPU layout for one whole
            # answer at a time (llm.model.bnb_cpu_inference inside `generate`): no turns to share there.
            task = loop.run_in_executor(None, whole_answer)
        else:
            # The chat template and tokenizer run in a thread: a long prompt must not hold up the event loop.
            decoder = await asyncio.to_thread(StepDecoder, self.generator.model, self.generator.tokenizer, prompt,
                                              stream=piece, **options)
            scheduler_for(self._generator_base).submit(
                Turn(decoder, AdapterSelection(self.generator), stop, finished, self.generator.adapter_name))
        try:
            while True:
                item = await asyncio.wait_for(queue.get(), self.limits.timeout_s)
                if item is done:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no text for {self.limits.timeout_s:g} s") from None
        finally:
            stop.set()  # the client left or the answer ended: the worker stops at its next piece
            del task

    async def complete(self, prompt: Any, **options: Any) -> str:
        """The whole answer (the pieces of `stream`, joined)."""
        async def collect() -> str:
            return "".join([piece async for piece in self.stream(prompt, **options)])
        return await self.limits.within_time(collect())


def _pil_image_type():
    from PIL import Image

    return Image.Image
