"""Method options as flags: every registered method's config field, declared once for all methods.

`--lr` is one flag whatever the method; its help says which methods use it. The CLI does not check
an option against the chosen method: the API does (`methods.registry.make_method` names the
method's own options when one does not apply), so there is no second parse that peeks at `--method`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from collections import Counter
from typing import Any

from .generate import option_parser

PREFIX = "opt_"
"""Parsed method options live at `args.opt_<field>`, apart from the function's own parameters."""


@dataclasses.dataclass
class _Field:
    name: str
    hint: str
    users: list[tuple[str, str, type]]  # (task, method, config class)
    defaults: list[Any]


def add_method_option_flags(parser: argparse.ArgumentParser, tasks: tuple[str, ...] | None,
                            taken: set[str]) -> list[str]:
    """Declare the union of the config fields of the methods of `tasks` (all tasks: None); return the field names.

    A field that is also a parameter of the command's function (`taken`) is left to that parameter.
    Help texts are read from the config classes' source only when help is shown (`write_option_help`):
    a run does not pay for parsing the sources of every method.
    """
    group = parser.add_argument_group("method options (each applies to the methods named in its help; "
                                      "`headstart methods` lists every method's own)")
    names = []
    for field in _union(tasks).values():
        if field.name in taken:
            continue
        option = "--" + field.name.replace("_", "-")
        parse, repeatable = option_parser(option, field.hint)
        action = group.add_argument(option, dest=PREFIX + field.name, default=None, type=parse,
                                    action="append" if repeatable else "store", metavar=field.name.upper())
        action.method_option = field  # type: ignore[attr-defined]  (read by write_option_help)
        names.append(field.name)
    return names


def write_option_help(parser: argparse.ArgumentParser) -> None:
    """Fill in the help of the method-option flags (called just before help is printed)."""
    pending = [a for a in parser._actions if getattr(a, "method_option", None) is not None and a.help is None]
    primary = _default_method() if pending else ""
    for action in pending:
        action.help = _help(action.method_option, primary).replace("%", "%%")  # argparse %-formats help text


def chosen_options(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The method options given on the command line (unset ones are left to the method's defaults)."""
    return {n: getattr(args, PREFIX + n) for n in names if getattr(args, PREFIX + n) is not None}


def _union(tasks: tuple[str, ...] | None) -> dict[str, _Field]:
    fields: dict[str, _Field] = {}
    for task, spec in method_specs(tasks):
        for f in dataclasses.fields(spec.config_cls):
            hint = f.type if isinstance(f.type, str) else inspect.formatannotation(f.type)
            entry = fields.setdefault(f.name, _Field(f.name, hint, [], []))
            entry.users.append((task, spec.name, spec.config_cls))
            entry.defaults.append(f.default if f.default is not dataclasses.MISSING
                                  else f.default_factory())  # type: ignore[misc]
    return fields


def _help(field: _Field, primary_method: str) -> str:
    """The field's docstring (the default method's wording, else the most common one), the methods that
    use it, and its default."""
    docs = {(task, method): field_docs(cls).get(field.name, "") for task, method, cls in field.users}
    common = Counter(d for d in docs.values() if d).most_common(1)
    doc = docs.get(("classify", primary_method)) or (common[0][0] if common else "")
    by_task: dict[str, list[str]] = {}
    for task, method, _ in field.users:
        by_task.setdefault(task, []).append(method)
    users = "; ".join(", ".join(names) if task == "classify" else f"{task}: {', '.join(names)}"
                      for task, names in by_task.items())
    default = field.defaults[0] if len({repr(d) for d in field.defaults}) == 1 else "by method"
    if default is None:
        default = "auto"
    elif isinstance(default, list):
        default = ",".join(map(str, default)) or "none"
    return f"{doc} [{users}] (default: {default})"


def method_specs(tasks: tuple[str, ...] | None) -> list[tuple[str, Any]]:
    """(task, MethodSpec) for every registered method of `tasks` (None: every task)."""
    from ..methods.registry import list_methods

    return [(task, spec) for task in (tasks or known_tasks()) for spec in list_methods(task)]


def _default_method() -> str:
    """The method a bare `headstart fit` runs: its wording leads a shared option's help."""
    try:
        from ..tasks import get_task
    except ImportError:
        return "probe"
    return get_task("classify").default_method


def known_tasks() -> tuple[str, ...]:
    try:
        from ..tasks import list_tasks  # the task registry, where it exists
    except ImportError:
        return ("classify", "sft", "dpo")
    return tuple(t if isinstance(t, str) else t.name for t in list_tasks())


@functools.lru_cache(maxsize=None)  # one class's source is parsed once, however many fields ask
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
