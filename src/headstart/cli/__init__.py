"""The `headstart` command: each subcommand is one typed API function (commands.py), its flags and help
generated from the function's signature and docstring (generate.py), method options from the method
config dataclasses (options.py).

A subcommand's flags are built only when that subcommand is chosen, so `headstart --help` imports no
API module (and no torch), and `headstart fit` imports what `fit` needs.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..core.errors import HeadstartError

__all__ = ["main", "build_parser"]


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: fills itself from its command's function the first time it parses."""

    def __init__(self, *args, command=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command
        self._built = False

    def parse_known_args(self, args=None, namespace=None):
        if self.command is not None and not self._built:
            self._built = True
            self.command.build(self)
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        # Help text that costs something to read (command summaries from source files, method-option
        # docstrings) is filled in only now, when it is shown.
        from .options import write_option_help

        write_option_help(self)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    choice.help = choice.help or action.choices[choice.dest].command.summary()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        # One line, like every other headstart error (scripts read the last stderr line).
        self.exit(2, f"headstart: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .commands import COMMANDS

    parser = CommandParser(prog="headstart", description="Turn a pretrained base into a specialist for one job: "
                           "fit, evaluate, predict, inspect bundles.")
    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for command in COMMANDS:
        sub.add_parser(command.name, command=command, help="",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return args._command.run(args)
    except HeadstartError as e:
        print(f"headstart: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `headstart methods | head`: the reader left; no traceback
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        hint = getattr(getattr(args, "_command", None), "interrupted", "")
        print(f"\nheadstart: interrupted; {hint}" if hint else "\nheadstart: interrupted", file=sys.stderr)
        return 130
