"""Label descriptions and prompt templates: the words zero-shot methods compare inputs against.

A description is given per label as `NAME=text` (CLI: `--label-text "NUM=a question asking for a number"`,
repeatable), as a JSON or YAML file mapping names to texts (`--label-text labels.yaml`), or as a dict
in Python. Labels without a description use their own name, made readable (`very_negative` ->
`very negative`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import ConfigError


def normalize_label_text(value: Any) -> list[str]:
    """Any accepted form -> a list of `NAME=text` / file-path entries (what a config stores)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def parse_label_text(entries: Iterable[str], classes: list[str], what: str = "label text") -> dict[str, str]:
    """`NAME=text` entries and description files -> {class name: description} for known classes.

    >>> parse_label_text(["NUM=a question asking for a number"], ["HUM", "NUM"])
    {'NUM': 'a question asking for a number'}
    """
    out: dict[str, str] = {}
    for entry in entries:
        path = Path(entry).expanduser()
        if "=" not in entry or (path.suffix.lower() in (".json", ".yaml", ".yml") and path.is_file()):
            out.update(_read_file(path, what))
            continue
        name, text = entry.split("=", 1)
        out[name.strip()] = text.strip()
    unknown = sorted(set(out) - set(classes))
    if unknown:
        raise ConfigError(f"{what} for unknown label(s) {', '.join(unknown)}; the labels are: {', '.join(classes)}")
    empty = sorted(k for k, v in out.items() if not v)
    if empty:
        raise ConfigError(f"empty {what} for {', '.join(empty)}")
    return out


def parse_answer_words(entries: Iterable[str], classes: list[str]) -> dict[str, str]:
    """`NAME=word` entries (or a JSON/YAML file): the word a causal LM answers for a label instead of its name.

    A label name the LM reads as something else (`ham` for "not spam") cannot be fixed by a description:
    the LM still has to answer `ham`. Answering `normal` can.

    >>> parse_answer_words(["ham=normal"], ["ham", "spam"])
    {'ham': 'normal'}
    """
    return parse_label_text(entries, classes, what="answer word")


def _read_file(path: Path, what: str = "label text") -> dict[str, str]:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} is neither NAME=text nor a JSON/YAML file that exists")
    raw = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except Exception as e:  # noqa: BLE001 -- any parse failure is the user's file, reported plainly
        raise ConfigError(f"{path}: cannot read label descriptions ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"{path}: expected a mapping of label name -> description text")
    return {str(k): v for k, v in data.items()}


def readable(name: str) -> str:
    """A label name as words: `very_negative` -> `very negative`, `Sci/Tech` stays."""
    return name.replace("_", " ").replace("-", " ").strip()


def label_phrases(classes: list[str], descriptions: dict[str, str]) -> list[str]:
    """Per class, the text that stands for it: its description, else its readable name."""
    return [descriptions.get(c) or readable(c) for c in classes]


def fill_templates(phrase: str, templates: list[str]) -> list[str]:
    """`phrase` put into each template's `{}` (a template without `{}` gets the phrase appended)."""
    return [t.replace("{}", phrase) if "{}" in t else f"{t} {phrase}".strip() for t in templates] or [phrase]


JARGON = {"ham"}
"""Label names that are domain jargon (`ham` = not spam): what a base reads as something else."""


def code_like(classes: list[str], descriptions: dict[str, str]) -> list[str]:
    """Labels without a description whose name is a code (`ABBR`, `NUM`, `LOC`, `c3`) or known jargon.

    >>> code_like(["ABBR", "HUM", "positive", "ham", "spam"], {"HUM": "a person"})
    ['ABBR', 'ham']
    """
    def coded(name: str) -> bool:
        word = readable(name)
        return (word.lower() in JARGON or (name.isupper() and len(word) <= 5)
                or any(ch.isdigit() for ch in word) or len(word) <= 2)
    return [c for c in classes if not descriptions.get(c) and coded(c)]
