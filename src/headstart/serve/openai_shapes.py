"""OpenAI's wire shapes for `routes_openai`: request checks, response objects, stream chunks, stop strings.

Kept apart from the routes so the exact JSON OpenAI clients parse lives in one place and can be read
against https://platform.openai.com/docs/api-reference without the HTTP plumbing around it.

>>> messages = chat_messages([{"role": "user", "content": "Hi"}])
>>> chat_response("chatcmpl-1", "trec-sft", "Hello", "stop", usage(5, 1))["choices"][0]["message"]
{'role': 'assistant', 'content': 'Hello'}
"""
from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

ROLES = ("system", "user", "assistant")
"""The chat roles a headstart generator's chat template knows; `developer` (OpenAI's newer name for
system) is read as `system`; `tool`/`function` turns are refused (the generators have no tool calling)."""

UNSUPPORTED_TRUE = ("logprobs", "echo")
"""Options refused when set to anything truthy: the generator does not compute them."""

UNSUPPORTED_PRESENT = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "suffix",
                       "response_format")
"""Options refused when present at all (not null): nothing here could honour them."""


class RequestProblem(ValueError):
    """A request that cannot be served as sent; `code` is OpenAI's machine-readable code, `param` the field."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None,
                 status: int = 400) -> None:
        super().__init__(message)
        self.code, self.param, self.status = code, param, status


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (`chatcmpl-...`, `cmpl-...`)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, code: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object: the openai client raises it as `openai.BadRequestError` etc. with this message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- requests ---------------------------------------------------------------------------------------
def refuse_unsupported(body: dict[str, Any]) -> None:
    """Refuse, by name, options that would silently change the answer's meaning if ignored."""
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestProblem(f"n={n} is not supported: one choice per request (send {n} requests)",
                             "unsupported_parameter", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestProblem("best_of is not supported", "unsupported_parameter", "best_of")
    for name in UNSUPPORTED_TRUE:
        if body.get(name):
            raise RequestProblem(f"{name} is not supported", "unsupported_parameter", name)
    for name in UNSUPPORTED_PRESENT:
        if body.get(name) is not None:
            raise RequestProblem(f"{name} is not supported by headstart generators", "unsupported_parameter", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestProblem(f"{name} is not supported (only 0)", "unsupported_parameter", name)


def generation_options(body: dict[str, Any], max_tokens_cap: int) -> dict[str, Any]:
    """The generator's options (`llm.generate.generate`) from OpenAI's names; only those the client sent,
    so the generator's own defaults apply otherwise. `max_tokens` (or `max_completion_tokens`) is capped
    at the server's limit (the answer then ends with finish_reason "length"), as `Limits` documents."""
    options: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens < 1:
            raise RequestProblem("max_tokens must be an integer >= 1", param="max_tokens")
        options["max_new_tokens"] = min(int(max_tokens), max_tokens_cap)
    else:
        options["max_new_tokens"] = min(256, max_tokens_cap)
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise RequestProblem(f"{name} must be a number in [{low}, {high}], got {value!r}", param=name)
        options[name] = float(value)
    if options.get("top_p") == 0.0:
        options["top_p"] = 1e-6  # OpenAI's top_p=0 means "most likely token only"; transformers needs > 0
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise RequestProblem("seed must be an integer", param="seed")
        options["seed"] = int(seed)
    return options


def stop_strings(body: dict[str, Any]) -> list[str]:
    """`stop`: null, one string or up to 4 strings (OpenAI's limit), none empty."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestProblem("stop must be a non-empty string or a list of at most 4 of them", param="stop")
    return stops


def chat_messages(messages: Any, max_chars: int | None = None) -> list[dict[str, str]]:
    """The conversation as `[{"role", "content": str}]`, checked: not empty, known roles, text content.

    Content may be a string or OpenAI's list of parts; only `text` parts are accepted (joined)."""
    if not isinstance(messages, list) or not messages:
        raise RequestProblem("messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestProblem(f"messages[{i}] must be an object with role and content", param="messages")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise RequestProblem(f"messages[{i}].role {message.get('role')!r} is not one of {', '.join(ROLES)}",
                                 "invalid_role", "messages")
        out.append({"role": role, "content": _text_content(message.get("content"), i)})
    if max_chars is not None and sum(len(m["content"]) for m in out) > max_chars:
        raise RequestProblem(f"the messages hold more than {max_chars} characters", "input_too_long", "messages", 413)
    return out


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise RequestProblem(f"messages[{i}] holds {sorted(str(k) for k in kinds - {'text'})} parts; "
                             "only text is supported", "unsupported_content", "messages")
    raise RequestProblem(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def completion_prompt(prompt: Any, max_chars: int | None = None) -> str:
    """`/v1/completions`' prompt: one string (or a list holding one); token-id prompts are refused."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise RequestProblem("one prompt per request: send a string, not a list of prompts or token ids",
                             "unsupported_parameter", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestProblem("prompt must be a non-empty string", param="prompt")
    if max_chars is not None and len(prompt) > max_chars:
        raise RequestProblem(f"prompt is longer than {max_chars} characters", "input_too_long", "prompt", 413)
    return prompt


def embedding_inputs(value: Any, max_chars: int | None = None, max_batch: int | None = None) -> list[str]:
    """`/v1/embeddings`' input: a string or a list of strings, none empty (token-id inputs are refused)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestProblem("input must be a string or a non-empty list of strings (token ids are not "
                             "supported)", param="input")
    if any(not t.strip() for t in texts):
        raise RequestProblem("input holds an empty string", param="input")
    if max_batch is not None and len(texts) > max_batch:
        raise RequestProblem(f"input holds {len(texts)} texts; this server takes at most {max_batch} per request",
                             "batch_too_large", "input", 413)
    if max_chars is not None and any(len(t) > max_chars for t in texts):
        raise RequestProblem(f"an input is longer than {max_chars} characters", "input_too_long", "input", 413)
    return texts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- responses -------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "headstart"}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str], finish: str | None = None) -> dict:
    """One `chat.completion.chunk`: the first carries the role, the last an empty delta and the finish reason."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def text_response(rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use}


def text_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk `stream_options: {"include_usage": true}` asks for: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": use}


def embedding_response(model: str, vectors: list[list[float]], encoding: str, prompt_tokens: int) -> dict:
    """`encoding`: "float" (lists) or "base64" (little-endian float32 bytes, what the openai client decodes)."""
    def encode(vector: list[float]) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        return [float(x) for x in vector]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


# ---- stop strings ------------------------------------------------------------------------------------
class StopCutter:
    """Cuts streamed text at the first stop string, never handing out a piece of one.

    `feed(piece)` returns the text safe to send now; a tail that could be the start of a stop string is
    held back until the next piece decides it. After a stop string is seen `stopped` is True and the
    rest is dropped; `flush()` returns what is held back once the stream ends without one.

    >>> cut = StopCutter(["\\n\\n"]); cut.feed("a\\n") + cut.feed("\\nb") + cut.flush(), cut.stopped
    ('a', True)
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            self.stopped, self.held = True, ""
            return text[:min(cuts)]
        keep = self._unsafe_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = ("" if self.stopped else self.held), ""
        return text

    def _unsafe_tail(self, text: str) -> int:
        """How many trailing characters of `text` could begin a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
