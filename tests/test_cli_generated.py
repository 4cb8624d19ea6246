"""The generated CLI: flags from typed functions and their docstrings, method options declared once,
every README command still parses, and start-up stays light (no torch for `--help` or `import headstart`)."""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest
from conftest import BIN, assert_clean_error, run_cmd

from headstart.cli import CommandParser, build_parser
from headstart.cli.generate import Flag, add_function_flags, param_docs
from headstart.core.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def toy(data: str, names: Sequence[str] = ("a", "b"), seeds: int | Sequence[int] = 5, *, resume: bool = False,
        use_cache: bool = True, oracle: bool | None = None, rate: float = 0.5, size: int | None = None,
        log: Callable[[str], None] = print, lookup: dict[str, int] | None = None) -> dict:
    """Do a toy job.

    Args:
        data: where the examples are
        names: which ones to run,
            in this order
        seeds: N (seeds 0..N-1) or a list
        resume: continue
        rate: how fast
    """
    return dict(locals())


def toy_parser(**flags: Flag) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_function_flags(parser, toy, flags, hidden=frozenset())
    return parser


def test_signature_makes_the_flags():
    args = toy_parser().parse_args(["d", "--names", "x,y", "--seeds", "3", "--resume", "--no-use-cache",
                                    "--oracle", "false", "--rate", "2", "--size", "7"])
    assert vars(args) == {"data": "d", "names": ["x", "y"], "seeds": 3, "resume": True, "use_cache": False,
                          "oracle": False, "rate": 2.0, "size": 7}  # log (a callable), lookup (a dict): no flag
    defaults = vars(toy_parser().parse_args(["d"]))
    assert defaults == {"data": "d", "names": ("a", "b"), "seeds": 5, "resume": False, "use_cache": True,
                        "oracle": None, "rate": 0.5, "size": None}
    assert toy_parser().parse_args(["d", "--seeds", "0,2"]).seeds == [0, 2]


def test_docstring_is_the_help():
    text = " ".join(toy_parser().format_help().split())
    assert "--names NAMES which ones to run, in this order (default: a,b)" in text
    assert "--rate RATE how fast (default: 0.5)" in text and "DATA where the examples are" in text


def test_prose_docstrings_name_parameters_in_backticks():
    def f(source: str, target_test: str | None = None, oracle: bool | None = None):
        """Adapt.

        `target_test`: labelled target data to measure on.
        `oracle`: train the target-oracle reference
        (default: whenever the target has labels).
        """

    assert param_docs(f) == {"target_test": "labelled target data to measure on.",
                             "oracle": "train the target-oracle reference (default: whenever the target has labels)."}


def test_a_spelling_can_invert_a_parameter():
    parser = toy_parser(use_cache=Flag("use_cache", ("--no-cache",), "skip the cache", invert=True))
    assert parser.parse_args(["d", "--no-cache"]).use_cache is False
    assert "skip the cache" in parser.format_help()


@pytest.mark.parametrize("argv,message", [(["--seeds", "two"], "--seeds 'two': expected a whole number or a comma"),
                                          (["--names", "a,"], "--names 'a,': expected a comma list of names"),
                                          (["--oracle", "maybe"], "--oracle 'maybe': expected one of auto")])
def test_bad_values_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        toy_parser().parse_args(["d", *argv])


def test_parser_errors_are_one_line(capsys):
    parser = CommandParser(prog="headstart")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("headstart: error: unrecognized arguments: --nope")


def test_cli_errors_from_argparse_are_one_line():
    assert_clean_error(run_cmd([str(BIN / "headstart"), "evaluate"]), "required", "bundle")
    # fit's DATA may be left out for --tasks; without either it is one clear line too
    assert_clean_error(run_cmd([str(BIN / "headstart"), "fit"]), "no training data", "data")


# ---- fit: method options once, from every registered method -----------------------------------------

@pytest.fixture(scope="module")
def fit_parser():
    parser = build_parser()
    parser.parse_args(["fit", "x"])  # builds the fit subparser (flags are built when the command is chosen)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]


def test_every_method_option_is_one_flag_with_help(fit_parser):
    from headstart.cli.options import method_specs

    help_text = fit_parser.format_help()
    options = [o for a in fit_parser._actions for o in a.option_strings]
    assert len(options) == len(set(options))  # one declaration per flag
    for task, spec in method_specs(None):
        for f in dataclasses.fields(spec.config_cls):
            assert f"--{f.name.replace('_', '-')}" in options, (task, spec.name, f.name)
    for action in fit_parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), action.option_strings
    assert "[sft: lora, qlora; dpo: lora, qlora]" in " ".join(help_text.split())  # says which methods use --beta etc.


def test_method_options_reach_the_api_unchecked(fit_parser):
    """The CLI does not know which options a method takes: it passes what was given; the API validates."""
    args = fit_parser.parse_args(["d", "--method", "probe", "--epochs", "3", "--lr", "0.1", "--label-text", "a=x",
                                  "--label-text", "b=y", "--gradual-unfreeze", "true"])
    from headstart.cli.options import chosen_options

    assert chosen_options(args, args._options) == {"epochs": 3, "lr": 0.1, "label_text": ["a=x", "b=y"],
                                                   "gradual_unfreeze": True}


def test_an_option_the_method_lacks_is_a_clean_error(tiny_text_csv):
    result = run_cmd([str(BIN / "headstart"), "fit", str(tiny_text_csv), "--base", "tiny-text", "--method", "probe",
                      "--unfreeze", "2"])
    assert_clean_error(result, "probe", "unfreeze")


def readme_commands() -> list[str]:
    """Every `headstart ...` command line in the README's code blocks (continuations joined, comments cut)."""
    text = README.read_text().replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\[(--[\w-]+)\]", r"\1", line.split("  #")[0].strip())  # `[--json]`: optional flag
        if line.startswith("headstart ") and not line.startswith("headstart lora"):  # a table row label
            lines.append(line)
    return lines


def test_readme_commands_still_parse():
    commands = readme_commands()
    assert len(commands) >= 25
    for line in commands:
        args = build_parser().parse_args(shlex.split(line)[1:])  # a spelling that no longer exists exits 2
        assert args.command == line.split()[1], line


# ---- start-up: nothing heavy before it is needed ---------------------------------------------------

def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_headstart_and_help_load_no_torch():
    assert "torch" not in _modules_after("import headstart; headstart.HeadstartError; headstart.__version__")
    code = "from headstart.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert "torch" not in _modules_after(code)


def test_bases_lists_from_static_facts_without_building_any():
    code = ("import json, io, contextlib\nfrom headstart.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    assert main(['bases', '--json']) == 0\n"
            "rows = json.loads(out.getvalue())\nassert {r['name'] for r in rows} >= {'efficientnet-lite0', 'minilm-l6'}")
    assert "torch" not in _modules_after(code)  # building a base imports torch; listing must not


def test_lazy_exports_resolve():
    import headstart

    assert set(headstart.__all__) <= set(dir(headstart))
    for name in headstart.__all__:
        assert getattr(headstart, name) is not None
    with pytest.raises(AttributeError):
        headstart.no_such_name  # noqa: B018


@pytest.mark.parametrize("argv,hint", [(["shots", "data"], "finished runs are in its shots.json"),
                                       (["rank", "data"], "rerun the same command with --resume to continue")])
def test_ctrl_c_prints_the_hint(monkeypatch, capsys, argv, hint):
    from headstart.cli import commands, main

    def interrupted(self, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.Command, "run", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"headstart: interrupted; {hint}"


# ---- what each command prints (renderers, on fake results: no training) -----------------------------

class _FakeSpecialist:
    def __init__(self, metrics):
        self.manifest = {"metrics": metrics}


@pytest.mark.parametrize("json_flag", [True, False])
def test_fit_prints_headline_json_for_classifiers_and_all_metrics_for_generators(capsys, json_flag):
    import json

    from headstart.cli import show

    args = argparse.Namespace(json=json_flag)
    show.fit(_FakeSpecialist({"accuracy": 0.9, "macro_f1": 0.8, "per_class_f1": {"a": 0.9}, "wall_s": 1.0}), args)
    out = capsys.readouterr().out.strip()
    if json_flag:
        assert json.loads(out.splitlines()[-1]) == {"accuracy": 0.9, "macro_f1": 0.8, "wall_s": 1.0}
    else:
        assert out == ""  # fit logged its report table already
    show.fit(_FakeSpecialist({"eval_loss": 1.5, "eval_loss_before": 2.0, "wall_s": 3.0}), args)
    out = capsys.readouterr().out.strip()
    assert json.loads(out if not json_flag else out.splitlines()[-1])["eval_loss"] == 1.5


def test_predict_prints_labels_or_answers(capsys):
    from headstart.cli import show

    rows = [{"input": "x", "label": "a", "score": 0.7, "top": [{"label": "a", "score": 0.7}, {"label": "b", "score": 0.3}]},
            {"input": "say hi", "answer": "hi"}]
    show.predict(rows, argparse.Namespace(json=False))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "a\t0.700\tx\t(b 0.300)" and out[1:3] == ["say hi", "hi"]
