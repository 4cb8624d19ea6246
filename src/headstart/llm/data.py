"""Instruction and preference data: JSONL (or a JSON list) of chat, alpaca or prompt/completion rows.

Every accepted shape becomes the same `ChatExample` (a list of role/content messages) or
`PreferenceExample`. As with text tables, a bad row is skipped with a reason ("file:line",
why) and never stops the run; only a file with nothing usable at all is an error.

>>> examples, skipped = load_sft_examples("alpaca_en_demo/train.jsonl")
>>> examples[0].messages
[{'role': 'user', 'content': 'Describe a process of making crepes.'}, {'role': 'assistant', 'content': 'Making crepes ...'}]
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..core.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
# ShareGPT and other exports name the roles differently.
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
}
SFT_SHAPES = (
    "alpaca {instruction, input?, output, system?}; "
    "chat {messages: [{role, content}, ...]} (or ShareGPT {conversations: [{from, value}, ...]}) "
    "with at least one non-empty assistant turn; "
    "prompt/completion {prompt: text or messages, completion: text}"
)
PREFERENCE_SHAPES = (
    "{prompt: text or messages ending with a user turn, chosen, rejected} where chosen/rejected are "
    "text or messages whose last message is the assistant answer (without prompt: chosen/rejected "
    "message lists sharing the same prompt turns)"
)

T = TypeVar("T")


@dataclass
class ChatExample:
    """One conversation: [{"role": "system"|"user"|"assistant", "content": str}, ...] with >= 1 assistant turn."""

    messages: list[dict[str, str]]


@dataclass
class PreferenceExample:
    """A prompt (messages ending with a user turn) and two answers to it, the preferred one first."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


class _Skip(Exception):
    """A row is unusable; the message is the reason shown to the user."""


# ---- public loaders ----------------------------------------------------------------------

def load_sft_examples(path: str | Path) -> tuple[list[ChatExample], list[tuple[str, str]]]:
    """(examples, skipped (row ref "file:line", reason)) from a .jsonl file or a .json list."""
    return _load(Path(path), _sft_row, "instruction (SFT)", SFT_SHAPES)


def load_sft_rows(path: str | Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """The raw rows (dicts) `load_sft_examples` accepts, in file order, and the skipped ones: for code that keys
    rows by their content (continual updates' journal)."""
    return _load(Path(path), lambda row: (_sft_row(row), row)[1], "instruction (SFT)", SFT_SHAPES)


def sft_messages(row: dict) -> list[dict[str, str]]:
    """The chat messages of one instruction row (any accepted shape)."""
    return _sft_row(row).messages


def load_preference_examples(path: str | Path) -> tuple[list[PreferenceExample], list[tuple[str, str]]]:
    """(examples, skipped (row ref "file:line", reason)) of prompt/chosen/rejected rows."""
    return _load(Path(path), _preference_row, "preference (DPO)", PREFERENCE_SHAPES)


def split_holdout(examples: list[T], fraction: float = 0.1, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, held): a seeded random `fraction` held out, at least one when there are >= 2 examples.

    Both parts keep the file's order. `fraction=0` holds nothing out.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    if n < 2 or fraction == 0:
        return list(examples), []
    n_held = min(n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# ---- file reading ------------------------------------------------------------------------

def _load(path: Path, parse: Callable[[dict], T], what: str, shapes: str) -> tuple[list[T], list[tuple[str, str]]]:
    if not path.exists():
        raise DataError(f"{path}: no such file; pass a .jsonl file (one JSON object per line) or a .json list")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the .jsonl or .json file itself (e.g. {path / 'train.jsonl'})")
    examples: list[T] = []
    skipped: list[tuple[str, str]] = []
    rows = 0
    for ref, obj in _records(path):
        rows += 1
        try:
            if isinstance(obj, _Skip):
                raise obj
            if not isinstance(obj, dict):
                raise _Skip(f"not a JSON object (a {type(obj).__name__})")
            examples.append(parse(obj))
        except _Skip as e:
            skipped.append((ref, str(e)))
    if not examples:
        if rows == 0:
            raise DataError(f"{path}: the file holds no rows. Accepted {what} row shapes: {shapes}")
        first = "; ".join(f"{ref}: {reason}" for ref, reason in skipped[:3])
        raise DataError(f"{path}: none of its {rows} rows is a usable {what} example ({first}). "
                        f"Accepted row shapes: {shapes}")
    return examples, skipped


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(row ref, parsed object or _Skip) per non-blank line; for a .json file holding a list, per item."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # often JSON Lines saved as .json: read it line by line below
        if isinstance(whole, list):
            for i, item in enumerate(whole, start=1):
                yield f"{path.name}:[{i}]", item
            return
        if isinstance(whole, dict):
            yield f"{path.name}:1", whole
            return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path.name}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path.name}:{lineno}", _Skip(f"not JSON ({e.msg})")


# ---- row shapes --------------------------------------------------------------------------

def _sft_row(row: dict) -> ChatExample:
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = _with_system(row, _messages(row[key], key))
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise _Skip(f"{key} has no non-empty assistant turn")
        return ChatExample(messages)
    if "instruction" in row:
        instruction = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        output = _text(row, "output")
        if not instruction.strip() and not extra.strip():
            raise _Skip("empty instruction")
        if not output.strip():
            raise _Skip("empty output")
        user = instruction if not extra.strip() else (f"{instruction}\n\n{extra}" if instruction.strip() else extra)
        return ChatExample(_with_system(row, [{"role": "user", "content": user},
                                              {"role": "assistant", "content": output}]))
    if "prompt" in row and "completion" in row:
        prompt = _prompt(row)
        completion = _answer(row, "completion")
        return ChatExample(prompt + [{"role": "assistant", "content": completion}])
    raise _Skip(f"no known row shape (keys: {', '.join(sorted(map(str, row))) or 'none'})")


def _preference_row(row: dict) -> PreferenceExample:
    if not any(k in row for k in ("prompt", "chosen", "rejected")):
        raise _Skip(f"no known row shape (keys: {', '.join(sorted(map(str, row))) or 'none'})")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _Skip(f"no {key!r} field")
    if "prompt" in row:
        prompt = _prompt(row)
    else:
        # Implicit prompt (Anthropic HH style): both answers are full conversations sharing their start.
        chosen_msgs = row["chosen"] if isinstance(row["chosen"], list) else None
        rejected_msgs = row["rejected"] if isinstance(row["rejected"], list) else None
        if chosen_msgs is None or rejected_msgs is None:
            raise _Skip("no 'prompt' field (needed when chosen/rejected are plain text)")
        head = _messages(chosen_msgs, "chosen")[:-1]
        if not head or head != _messages(rejected_msgs, "rejected")[:-1]:
            raise _Skip("no 'prompt' field, and chosen/rejected do not share the same prompt turns")
        prompt = _with_system(row, head)
        if prompt[-1]["role"] != "user":
            raise _Skip(f"prompt must end with a user turn, not {prompt[-1]['role']}")
    chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
    if chosen == rejected:
        raise _Skip("chosen and rejected are identical")
    return PreferenceExample(prompt, chosen, rejected)


def _prompt(row: dict) -> list[dict[str, str]]:
    """The `prompt` field as messages ending with a user turn (a string becomes one user message)."""
    value = row["prompt"]
    if isinstance(value, list):
        messages = _with_system(row, _messages(value, "prompt"))
        if not messages:
            raise _Skip("empty prompt")
        if messages[-1]["role"] != "user":
            raise _Skip(f"prompt must end with a user turn, not {messages[-1]['role']}")
        return messages
    text = _text(row, "prompt")
    if not text.strip():
        raise _Skip("empty prompt")
    return _with_system(row, [{"role": "user", "content": text}])


def _answer(row: dict, key: str) -> str:
    """An answer field: text, or messages whose last message is the (assistant) answer."""
    value = row.get(key)
    if isinstance(value, list):
        messages = _messages(value, key)
        if not messages:
            raise _Skip(f"empty {key}")
        if messages[-1]["role"] != "assistant":
            raise _Skip(f"last message of {key} is a {messages[-1]['role']} turn, not the assistant answer")
        text = messages[-1]["content"]
    else:
        text = _text(row, key)
    if not text.strip():
        raise _Skip(f"empty {key}")
    return text


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """Validate and normalise a list of {role, content} (or ShareGPT {from, value}) messages."""
    if not isinstance(value, list):
        raise _Skip(f"{key} is not a list of messages")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise _Skip(f"{key} message {i} is not an object")
        raw_role = m.get("role", m.get("from"))
        role = ROLE_ALIASES.get(str(raw_role).strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise _Skip(f"{key} message {i} has role {raw_role!r} (accepted: {', '.join(ROLES)}; "
                        f"ShareGPT human/gpt/system)")
        content = m.get("content", m.get("value"))
        if not isinstance(content, str):
            raise _Skip(f"{key} message {i} has no text content")
        out.append({"role": role, "content": content})
    return out


def _with_system(row: dict, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Prepend a row-level `system` text unless the messages already open with a system turn."""
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _Skip(f"no {key!r} field" if key not in row else f"empty {key}")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Skip(f"{key} is not text (a {type(value).__name__})")
    return value if isinstance(value, str) else str(value)
