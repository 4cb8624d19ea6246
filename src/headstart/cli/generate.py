"""Build a subcommand's flags from a typed Python function: its signature gives the flags and their
types, its docstring the help text (litgpt's way; `Command` in commands.py names the function).

    def rank(data: str, bases: Sequence[str] | str | None = None, *, by: str = "logme", ...) -> Ranking:
        '''Score every (base, layer) candidate ... `by`: the score that orders the ranking ...'''
    ->  headstart rank DATA [--bases BASES] [--by BY] ...

Rules, so a new API parameter needs no CLI edit:
- a parameter without a default is positional; one with a default is `--its-name`;
- `bool` = False is a switch; `bool` = True gets `--its-name/--no-its-name`; `bool | None` takes auto/true/false;
- `int`/`float` parse as such; `Sequence[int]` and `Sequence[str]` take a comma list, `int | Sequence[int]`
  either; anything that accepts `str` is passed through as text (the API parses it);
- parameters no command line can spell (callables, dicts, loaded objects) are left out;
- help: a Google-style `Args:` entry, else a docstring line starting with `name:` or `` `name` ``.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..core.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """How one parameter is spelled on the command line, where the generated spelling will not do."""

    param: str
    """The API parameter (or, for an extra flag, the keyword it is passed as)."""
    spelling: tuple[str, ...] = ()
    """Option strings (`--no-cache`); empty: `--param-name`, or positional when the parameter has no default."""
    help: str = ""
    """Help text; empty: the docstring's. Needed where the spelling inverts the parameter."""
    invert: bool = False
    """A switch that passes False (`--no-cache` -> `use_cache=False`)."""
    required: bool = False
    """An option that must be given (`adapt --source`)."""
    nargs: str | None = None
    """`+` for several words; with `join`, they are joined into one string."""
    join: bool = False
    positional: bool = False
    """Positional although the parameter has a default (`update BUNDLE [DATA ...]`: nargs `*`)."""


def add_function_flags(parser: argparse.ArgumentParser, fn: Callable, flags: dict[str, Flag],
                       hidden: frozenset[str]) -> list[str]:
    """Declare one argument per parameter of `fn` on `parser`; return the parameter names declared
    (their parsed values are passed to `fn` as keywords of the same name)."""
    docs = param_docs(fn)
    declared = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in hidden or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        hint = _hint_text(p.annotation)
        flag = flags.get(p.name, Flag(p.name))
        default = None if p.default is p.empty else p.default
        positional = (p.default is p.empty or flag.positional) and not flag.spelling
        kwargs = _argument(p.name, hint, default, flag, positional=positional)
        if kwargs is None:
            continue  # not spellable on a command line (a callable, a dict, a loaded model)
        help_text = flag.help or docs.get(p.name, "")
        if default is not None and not kwargs.get("action") and "default" not in help_text.lower():
            help_text += f" (default: {_show_default(default)})"
        kwargs["help"] = help_text.strip().replace("%", "%%")  # argparse %-formats help text
        if positional:
            parser.add_argument(p.name, **kwargs)
        else:
            spelling = flag.spelling or (_option(p.name),)
            parser.add_argument(*spelling, dest=p.name, required=flag.required, **kwargs)
        declared.append(p.name)
    return declared


def _argument(name: str, hint: str, default: Any, flag: Flag, positional: bool) -> dict | None:
    """argparse keywords for one parameter, from its type hint; None when no command line can spell it."""
    alternatives = _alternatives(hint)
    if positional and flag.nargs:
        return {"nargs": flag.nargs, "metavar": name.upper(), "default": default}
    if positional and (m := re.fullmatch(r"(?:Sequence|list|tuple)\[(\w+)\]", " ".join(alternatives))):
        return {"nargs": "+", "type": {"int": int, "float": float}.get(m.group(1), str),  # `predict B x.jpg y.jpg`
                "metavar": name.upper()}
    if alternatives == {"bool"} or flag.invert:
        if flag.invert:
            return {"action": "store_false", "default": True}
        if default is True:  # on by default: --merged keeps it on, --no-merged turns it off
            return {"action": argparse.BooleanOptionalAction, "default": True}
        return {"action": "store_true", "default": False}
    if alternatives == {"bool", "None"}:
        return {"type": _choice_parser(_option(name), {"auto": None, "true": True, "false": False}),
                "default": default, "metavar": "{auto,true,false}"}
    if flag.nargs:
        return {"nargs": flag.nargs, "default": default}
    parse = _value_parser(_option(name), alternatives - {"None"})
    if parse is None:
        return None
    return {"type": parse, "default": default, "metavar": name.upper()}


def _value_parser(option: str, alternatives: set[str]) -> Callable[[str], Any] | None:
    lists = {a for a in alternatives if re.fullmatch(r"(Sequence|list|tuple)\[\w+\]", a)}
    if alternatives & {"str", "Path"}:
        return str
    if lists == {"Sequence[int]"} or lists == {"list[int]"}:
        return _comma_parser(option, int, alone=int if "int" in alternatives else None)
    if lists == {"Sequence[str]"} or lists == {"list[str]"}:
        return _comma_parser(option, str)
    if lists == {"list[float]"} or lists == {"Sequence[float]"}:
        return _comma_parser(option, float)
    if alternatives == {"int"}:
        return int
    if alternatives <= {"int", "float"} and alternatives:
        return float
    return None


def _comma_parser(option: str, typ: type, alone: type | None = None) -> Callable[[str], Any]:
    """`a,b,c` -> [a, b, c]; with `alone`, a value without a comma is that type (`--seeds 5` = five seeds).
    A bad value is a one-line ConfigError, raised through argparse (which only catches ValueError)."""
    what = {int: "whole numbers", float: "numbers", str: "names"}[typ]
    example = {int: "0,2,8", float: "0.001,0.01", str: "probe,lora"}[typ]

    def parse(text: str) -> Any:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [typ(p) for p in parts]
            if "" in parts:
                raise ValueError
        except ValueError:
            either = f"a {what[:-1]} or " if alone else ""
            raise ConfigError(f"{option} {text!r}: expected {either}a comma list of {what}, e.g. {example}") from None
        return values[0] if alone and "," not in text else values

    return parse


def _choice_parser(option: str, choices: dict[str, Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.lower() not in choices:
            raise ConfigError(f"{option} {text!r}: expected one of {', '.join(choices)}")
        return choices[text.lower()]

    return parse


def bool_parser(option: str) -> Callable[[str], bool]:
    """`--gradual-unfreeze true`: config booleans take a value, so a default of True can be turned off."""
    values = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    return _choice_parser(option, values)


def option_parser(option: str, hint: str) -> tuple[Callable[[str], Any], bool]:
    """(parser, repeatable) for a method-config field: `list[str]` fields repeat (`--label-text A=.. --label-text
    B=..`, since an entry may hold commas); other lists take a comma list."""
    alternatives = _alternatives(hint) - {"None"}
    if alternatives == {"bool"}:
        return bool_parser(option), False
    if alternatives == {"list[str]"}:
        return str, True
    return _value_parser(option, alternatives) or str, False


def _alternatives(hint: str) -> set[str]:
    """`int | Sequence[int] | None` -> {"int", "Sequence[int]", "None"}; `Optional[X]` counts as X | None."""
    hint = hint.replace(" ", "").replace("'", "").replace('"', "")
    if m := re.fullmatch(r"Optional\[(.*)\]", hint):
        hint = m.group(1) + "|None"
    parts, depth, current = [], 0, ""
    for ch in hint:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return {p.replace("typing.", "").replace("collections.abc.", "").replace("pathlib.", "") for p in parts if p}


def _hint_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "str"
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show_default(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


# ---- docstrings -----------------------------------------------------------------------------------

def param_docs(fn: Callable) -> dict[str, str]:
    """Per-parameter help from `fn`'s docstring: Google-style `Args:` entries, else lines that start with
    `name: text`, `` `name`: text `` or `` `name=value` does ... ``; continuation lines are joined."""
    names = set(inspect.signature(fn).parameters)
    docs: dict[str, str] = {}
    current = None
    in_args = False
    for line in (inspect.getdoc(fn) or "").splitlines():
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped):
            in_args, current = True, None
            continue
        entry = _entry(line, in_args)
        if entry and entry[0] in names and (in_args or entry[0] not in docs):
            current, docs[entry[0]] = entry
        elif stripped and current and not stripped.startswith(">>>") and (not in_args or line.startswith("    ")):
            docs[current] += " " + stripped
        else:
            current = None
            in_args = in_args and bool(stripped)
    return {k: _first_sentences(v) for k, v in docs.items()}


def _entry(line: str, in_args: bool) -> tuple[str, str] | None:
    """(name, text) when `line` starts a parameter's entry."""
    if in_args:  # `    name: text` or `    name (type): text`
        m = re.match(r" +(\w+)(?: \([^)]*\))?: (.*)", line)
    else:  # `name: text` at the margin, `` `name`: text ``, `` `name=value` does ... ``
        m = re.match(r"(\w+): (.*)", line) or re.match(r"\s*`(\w+)(?:=[^`]*)?`:? (.*)", line)
    return (m.group(1), m.group(2)) if m else None


def _first_sentences(text: str, limit: int = 320) -> str:
    """Help for one flag: the doc entry, cut at a sentence end when it runs long."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[:cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0] + " ..."


def summary_without_import(module_file: str, qualname: str) -> str | None:
    """The first docstring line of `qualname` in a source file, read with `ast` so that listing the commands
    (`headstart --help`) imports none of them (importing the API would import torch). None if not found."""
    try:
        with open(module_file, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    scope: Any = tree
    for part in qualname.split("."):
        scope = next((n for n in getattr(scope, "body", []) if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part), None)
        if scope is None:
            return None
    doc = ast.get_docstring(scope)
    return first_sentence(doc) if doc else None


def description(fn: Callable) -> str:
    """`fn`'s docstring as a command's description: its prose, without the parameter entries (each flag's
    help shows its own), the `Args:` section or doctests."""
    names = set(inspect.signature(fn).parameters)
    paragraphs = []
    for paragraph in (inspect.getdoc(fn) or "").split("\n\n"):
        first = paragraph.strip().splitlines()[0] if paragraph.strip() else ""
        if re.fullmatch(r"(Args|Arguments|Parameters|Returns|Raises):", first) or first.startswith(">>>"):
            break
        entry = _entry(first, in_args=False)
        if first and not (entry and entry[0] in names):
            paragraphs.append(paragraph.strip())
    return "\n\n".join(paragraphs)


def first_sentence(doc: str) -> str:
    """The docstring's first sentence (its first paragraph, cut at the first full stop)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[:end + 1]
