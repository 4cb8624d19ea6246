"""Method options as flags: every registered method's config field, declared once for all methods.

`--lr` is one flag whatever the method; its help says which methods use it. The CLI does not check
an option against the chosen method: the API does (`methods.registry.make_method` names the
method's own options when one does not apply), so there is no second parse that peeks at `--method`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
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
    docs: list[str]
    primary_doc: str  # the default method's wording (`fit --help` describes what a bare `fit` does)
    users: list[tuple[str, str]]  # (task, method)
    defaults: list[Any]


def add_method_option_flags(parser: argparse.ArgumentParser, tasks: tuple[str, ...] | None,
                            taken: set[str]) -> list[str]:
    """Declare the union of the config fields of the methods of `tasks` (all tasks: None); return the field names.

    A field that is also a parameter of the command's function (`taken`) is left to that parameter.
    """
    group = parser.add_argument_group("method options (each applies to the methods named in its help; "
                                      "`headstart methods` lists every method's own)")
    names = []
    for field in _union(tasks, _default_method()).values():
        if field.name in taken:
            continue
        option = "--" + field.name.replace("_", "-")
        parse, repeatable = option_parser(option, field.hint)
        group.add_argument(option, dest=PREFIX + field.name, default=None, type=parse,
                           action="append" if repeatable else "store", metavar=field.name.upper(),
                           help=_help(field).replace("%", "%%"))
        names.append(field.name)
    return names


def chosen_options(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The method options given on the command line (unset ones are left to the method's defaults)."""
    return {n: getattr(args, PREFIX + n) for n in names if getattr(args, PREFIX + n) is not None}


def _union(tasks: tuple[str, ...] | None, default_method: str) -> dict[str, _Field]:
    fields: dict[str, _Field] = {}
    for task, spec in method_specs(tasks):
        docs = field_docs(spec.config_cls)
        hints = {f.name: f.type for f in dataclasses.fields(spec.config_cls)}
        for f in dataclasses.fields(spec.config_cls):
            hint = hints[f.name] if isinstance(hints[f.name], str) else inspect.formatannotation(hints[f.name])
            entry = fields.setdefault(f.name, _Field(f.name, hint, [], "", [], []))
            entry.users.append((task, spec.name))
            entry.defaults.append(f.default if f.default is not dataclasses.MISSING
                                  else f.default_factory())  # type: ignore[misc]
            entry.docs.append(docs.get(f.name, ""))
            if (task, spec.name) == ("classify", default_method):
                entry.primary_doc = entry.docs[-1]
    return fields


def _help(field: _Field) -> str:
    docs = [d for d in field.docs if d]
    doc = field.primary_doc or (Counter(docs).most_common(1)[0][0] if docs else "")
    by_task: dict[str, list[str]] = {}
    for task, method in field.users:
        by_task.setdefault(task, []).append(method)
    users = "; ".join(names if task == "classify" else f"{task}: {names}"
                      for task, names in ((t, ", ".join(dict.fromkeys(m))) for t, m in by_task.items()))
    distinct = {repr(d) for d in field.defaults}
    default = field.defaults[0] if len(distinct) == 1 else "by method"
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
