"""The command table: each `headstart` subcommand names one typed API function, and the printer for its
result. Flags come from the function (generate.py); only spellings that differ from a parameter are here.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import show
from .generate import Flag, add_function_flags, description, first_sentence, summary_without_import
from ..core.errors import ConfigError
from .options import add_method_option_flags, chosen_options

HIDDEN = frozenset({"log", "progress"})
"""Parameters the CLI fills itself: logs go to stdout (stderr with --json); progress bars unless --json."""

RESUME_HINT = "rerun the same command with --resume to continue"

OFF_SWITCHES = {  # parameters on by default, turned off by the switches users know
    "use_cache": Flag("use_cache", ("--no-cache",), "do not read or write the feature cache", invert=True),
    "skip_placeholders": Flag("skip_placeholders", ("--keep-placeholders",), invert=True,
                              help="keep images with very few colours (line art, icons) instead of skipping them "
                                   "as placeholders"),
}


@dataclass(frozen=True)
class Command:
    name: str
    function: str
    """`module:qualname` of the API function whose signature and docstring make the flags and help."""
    show: Callable[[Any, argparse.Namespace], None]
    flags: dict[str, Flag] = field(default_factory=dict)
    leading: tuple[Flag, ...] = ()
    """Positionals declared before the function's own (`generate BUNDLE PROMPT`)."""
    hidden: frozenset[str] = HIDDEN
    option_tasks: tuple[str, ...] | None = None
    """When the function takes `**options`: the tasks whose method-config fields become flags (None: all)."""
    json: str = "print the result as JSON on the last stdout line (logs go to stderr)"
    call: Callable[..., Any] | None = None
    """`call(args, **kwargs)` when not `function(**kwargs)` (generate loads the bundle, then streams)."""
    examples: str = ""
    value_errors: bool = False
    """The function reports bad arguments as ValueError: shown as one-line errors, not tracebacks."""
    help: str = ""
    """The one-line summary in `headstart --help`, where the function's first sentence speaks Python."""
    interrupted: str = RESUME_HINT

    def resolve(self) -> Callable:
        module, _, qualname = self.function.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def summary(self) -> str:
        """The function's first docstring sentence, read from its source so that `headstart --help` imports nothing."""
        if self.help:
            return self.help
        module, _, qualname = self.function.partition(":")
        root = Path(__file__).resolve().parents[1]  # src/headstart
        relative = Path(*module.split(".")[1:])
        for path in (root / relative.with_suffix(".py"), root / relative / "__init__.py"):
            if path.is_file() and (line := summary_without_import(str(path), qualname)):
                return line
        return first_sentence(inspect.getdoc(self.resolve()) or "")

    def build(self, parser: argparse.ArgumentParser) -> None:
        fn = self.resolve()
        parts = [self.help, description(fn), self.examples]
        parser.description = "\n\n".join(p for p in parts if p)
        for flag in self.leading:
            parser.add_argument(flag.param, help=flag.help, nargs=flag.nargs)
        declared = add_function_flags(parser, fn, self.flags, self.hidden)
        params = inspect.signature(fn).parameters
        options: list[str] = []
        if any(p.kind is p.VAR_KEYWORD for p in params.values()) and self.call is None:
            options = add_method_option_flags(parser, self.option_tasks, set(declared))
        if self.json:
            parser.add_argument("--json", action="store_true", help=self.json)
        parser.set_defaults(_command=self, _declared=[f.param for f in self.leading] + declared, _options=options,
                            _params=set(params))

    def run(self, args: argparse.Namespace) -> int:
        kwargs = {name: getattr(args, name) for name in args._declared}
        kwargs = {k: (" ".join(v) if self._joins(k) and isinstance(v, list) else v) for k, v in kwargs.items()}
        quiet = getattr(args, "json", False)
        if "log" in args._params:
            stream = sys.stderr if quiet else sys.stdout
            kwargs["log"] = lambda s: print(s, file=stream, flush=True)
        if "progress" in args._params:
            kwargs["progress"] = not quiet
        kwargs.update(chosen_options(args, args._options))
        try:
            result = self.call(args, **kwargs) if self.call else self.resolve()(**kwargs)
        except ValueError as e:
            if not self.value_errors:
                raise
            raise ConfigError(str(e)) from None
        self.show(result, args)
        return 0

    def _joins(self, name: str) -> bool:
        return any(f.param == name and f.join for f in (*self.flags.values(), *self.leading))


@dataclass(frozen=True)
class Group:
    """A command whose subcommands are commands (`headstart hub add ...`); `headstart hub --help` lists them
    with their first docstring sentences. Built only when chosen, as a Command is."""

    name: str
    help: str
    """The one-line summary in `headstart --help`."""
    commands: tuple[Command, ...]
    examples: str = ""

    def summary(self) -> str:
        return self.help

    def build(self, parser: argparse.ArgumentParser) -> None:
        parser.description = "\n\n".join(p for p in (self.help, self.examples) if p)
        sub = parser.add_subparsers(dest=f"{self.name}_command", metavar="COMMAND", parser_class=type(parser))
        for command in self.commands:
            sub.add_parser(command.name, command=command, help="", formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(_command=self, _group_parser=parser)  # a chosen subcommand sets its own _command

    def run(self, args: argparse.Namespace) -> int:
        """`headstart hub` alone: the group's help, and the exit status of a usage error."""
        args._group_parser.print_help()
        return 2


def _generate(args: argparse.Namespace, bundle: str, prompt: str, **options: Any) -> str | None:
    """`generate`'s flags are `llm.generate.generate`'s options; the bundle's specialist runs them."""
    from ..bundle.commands import load
    from ..core.errors import BundleError

    spec = load(bundle)
    if not hasattr(spec, "generate"):
        raise BundleError(f"{bundle} is a classifier bundle; `generate` needs an sft/dpo bundle")
    if args.json:
        return spec.generate(prompt, **options)
    spec.generate(prompt, stream=lambda piece: print(piece, end="", flush=True), **options)
    return None


OUT_FLAG = Flag("out", ("--out",))
REPORT_JSON = "print the report as JSON on the last stdout line"
HEAD_FLAG = Flag("head", ("--task", "--head"), "which head of a bundle with a head per task (multi-task fits, "
                 "merges of different tasks)")

HUB_FLAG = Flag("hub", ("--hub",), "the hub folder", required=True)
HUB = Group("hub", "Share specialists through a hub folder: add, list, search, show, pull, remove; push to and "
            "pull from the Hugging Face Hub.", (
    Command("add", "headstart.hub.local:add", show.hub_added, flags={"hub": HUB_FLAG},
            json="print the new entry as JSON"),
    Command("list", "headstart.hub.local:list_entries", show.hub_entries, flags={"hub": HUB_FLAG},
            json="print the entries as a JSON list"),
    Command("search", "headstart.hub.local:search", show.hub_entries, flags={"hub": HUB_FLAG},
            json="print the matching entries as a JSON list"),
    Command("show", "headstart.hub.local:show", show.hub_show, flags={"hub": HUB_FLAG},
            json="print the facts, metrics, card and files as JSON"),
    Command("pull", "headstart.hub.local:pull", show.hub_pulled, flags={
        "hub": Flag("hub", ("--hub",), "the hub folder (not needed for hf:owner/repo)"),
        "out": Flag("out", ("--out",), "the bundle folder to write", required=True)},
        json='print {"path": ...} as JSON'),
    Command("remove", "headstart.hub.local:remove", show.hub_removed, flags={"hub": HUB_FLAG},
            json="print the removed entry as JSON"),
    Command("push", "headstart.hub.remote:push", show.hub_pushed, flags={
        "hub": HUB_FLAG, "repo_id": Flag("repo_id", ("--repo-id",), "the model repository, owner/name (created "
                                         "when missing)", required=True)},
        hidden=HIDDEN | {"token"}, json='print {"url": ...} as JSON',
        help="Upload a hub specialist to a Hugging Face Hub repository (token: HF_TOKEN or `hf auth login`)."),
    Command("reindex", "headstart.hub.index:rebuild_index", show.hub_reindexed, flags={"hub": HUB_FLAG},
            json="print the index as JSON"),
), examples=(
    "Examples:\n  headstart hub add runs/ants --hub hub/\n"
    "  headstart hub search --hub hub/ --task image-classification --metric accuracy --min-value 0.9\n"
    "  headstart hub pull ants --hub hub/ --out elsewhere/ants\n"
    "  headstart hub push ants --hub hub/ --repo-id me/ants"))

COMMANDS: list[Command | Group] = [
    Command("bases", "headstart.bases:list_bases", show.bases, json="print a JSON list",
            help="List the known bases: name, kind, parameters, source (from their static facts; builds none)."),
    Command("methods", "headstart.methods.registry:list_methods", show.methods, json="",
            help="List the methods of a task and their options.", flags={
                "task": Flag("task", help="the task whose methods to list: classify, sft or dpo (default: classify)")}),
    Command("fit", "headstart.api:fit", show.fit, flags={
        **OFF_SWITCHES, "data": Flag("data", positional=True, nargs="?"),
        "tasks": Flag("tasks", nargs="+", help="multi-task: name=data pairs (a shared body, a head per task)")},
        help="Specialise a base on labelled data "
            "(classify), instructions (sft) or preference pairs (dpo); --out writes the bundle.",
        json="print the final metrics as JSON on the last stdout line", examples=(
        "Examples:\n  headstart fit ../shared/data/hymenoptera --base efficientnet-lite0 --method lora --out runs/ants\n"
        "  headstart fit ../shared/data/trec --base minilm-l6 --method probe --shots 8 --seed 1 --out runs/trec-8\n"
        "  headstart fit --tasks sst2=../shared/data/sst2 trec=../shared/data/trec --method lora --out runs/multi")),
    Command("shots", "headstart.experiments.shots:run_shots", show.shots, json='print {"results": [...]} as JSON on '
            "the last stdout line", interrupted="finished runs are in its shots.json", examples=(
                "Example:\n  headstart shots ../shared/data/trec --base minilm-l6 --methods zeroshot,probe,lora "
                "--shots 0,2,8,32 --seeds 3")),
    Command("adapt", "headstart.experiments.adapt:adapt", show.adapt, flags={
        **OFF_SWITCHES,
        "source": Flag("source", ("--source",), "labelled source data (image folder or text table), as for `fit`",
                       required=True),
        "target": Flag("target", ("--target",), "target-domain data; its labels, if any, are hidden from the method",
                       required=True),
    }, option_tasks=("classify",), json="print the report as JSON on the last stdout line", examples=(
        "Examples:\n  headstart corrupt ../shared/data/hymenoptera --blur 2 --dark 0.4 --out /tmp/ants-factory\n"
        "  headstart adapt --source ../shared/data/hymenoptera --target /tmp/ants-factory --method adabn")),
    Command("corrupt", "headstart.data.corrupt:corrupt_folder", show.nothing, flags={
        "out": Flag("out", ("--out",), "folder to write (must not exist or be empty, unless --overwrite)",
                    required=True),
        "skip_placeholders": OFF_SWITCHES["skip_placeholders"],
    }, json="", value_errors=True, help="Make a reproducible \"clean -> blurry, dark, noisy\" copy of an image "
        "folder (a domain shift to adapt to)."),
    Command("rank", "headstart.transfer.rank:rank", show.rank, json='print {"candidates": [...]} (best first) as '
            "JSON on the last stdout line"),
    Command("evaluate", "headstart.bundle.commands:evaluate", show.evaluate, json="print the metrics as JSON",
            flags={"head": HEAD_FLAG}, help="Evaluate a bundle on held-out data: accuracy and F1 (classifiers), loss and perplexity (generators)."),
    Command("predict", "headstart.bundle.commands:predict", show.predict, json='print {"predictions": [...]} as JSON',
            flags={"head": HEAD_FLAG}, help="Predict labels for image files or texts (classifiers), or answer prompts (generators)."),
    Command("info", "headstart.bundle.commands:info", show.info, json="print what the bundle holds as JSON"),
    Command("generate", "headstart.llm.generate:generate", show.generate, leading=(
        Flag("bundle", help="an sft/dpo bundle"),), flags={
        "prompt": Flag("prompt", help="the instruction (several words are joined)", nargs="+", join=True)},
        hidden=HIDDEN | {"model", "tokenizer"}, call=_generate,
        help="Answer a prompt with an sft/dpo bundle, streaming tokens as they are produced.",
        json='print {"answer": ...} instead of streaming'),
    Command("update", "headstart.api:update", show.update, flags={
        "data": Flag("data", help="tonight's files: tables (text,label), image folders (<class>/*), or both",
                     positional=True, nargs="*")},
        json="print the report as JSON on the last stdout line",
        help="Teach a specialist new data as a new version; rejected if it forgets an earlier night.",
        interrupted="rerun the same command: it resumes, and the current version is untouched", examples=(
            "Examples:\n  headstart update runs/intents tonight.csv\n"
            "  headstart update runs/factory unlabelled_today/ --unlabelled\n"
            "  headstart update runs/intents --watch inbox/            # cron: learn what arrived, then exit")),
    Command("history", "headstart.api:history", show.history, json="print the versions as a JSON list",
            help="List a specialist's versions: parent, strategy, examples, guard figures; * marks the current one."),
    Command("rollback", "headstart.api:rollback", show.rollback, json="",
            flags={"to": Flag("to", ("--to",), "the version to make current", required=True)},
            help="Make an earlier version of a specialist current again (no version is deleted)."),
    Command("diff", "headstart.api:diff", show.diff, json="print the differences as JSON",
            help="What changed between two versions of a specialist: labels, metrics, guard figures."),
    Command("merge", "headstart.combine.merge:merge", show.merge, flags={
        "bundles": Flag("bundles", positional=True, nargs="+"), "out": OUT_FLAG}, json=REPORT_JSON,
        help="Merge specialists of one base into one (soups, task arithmetic, TIES, DARE; a head per task), "
             "scored beside each specialist alone.", examples=(
            "Examples:\n  headstart merge runs/trec-s0 runs/trec-s1 runs/trec-s2 --method soup --greedy-on val "
            "--out runs/trec-soup\n  headstart merge runs/sst2 runs/trec runs/emotion runs/subj --method ties --density 0.2 "
            "--out runs/four-in-one")),
    Command("federate", "headstart.combine.federated.run:federate", show.federate, flags={
        "data": Flag("data", help="the dataset to deal to the clients, or one table per client with --split by-file",
                     positional=True, nargs="*"), "out": OUT_FLAG}, option_tasks=("classify",), json=REPORT_JSON,
        help="Train one specialist across clients that never share their data (Flower: FedAvg, FedProx, "
             "optional DP); only adapter + head tensors travel.", examples=(
            "Examples:\n  headstart federate ../shared/data/banking77 --clients 10 --split dirichlet:0.3 --rounds 20 "
            "--method lora --out runs/fed\n  headstart federate ../shared/data/banking77 --server --clients 2 --out "
            "runs/fed\n  headstart federate --client shard0.csv --server-address 127.0.0.1:9092")),
    Command("export", "headstart.bundle.commands:export", show.export, flags={
        "out": Flag("out", ("--out",), required=True), "head": HEAD_FLAG}, json=""),
    Command("serve", "headstart.serve.app:serve", show.nothing, json="", interrupted="", examples=(
        "Examples:\n  headstart serve runs/ants runs/trec-ft hub/ --port 8080 --token-file ~/.headstart-token\n"
        "  curl -H \"Authorization: Bearer $(cat ~/.headstart-token)\" -d '{\"inputs\": \"Who wrote Hamlet ?\"}' "
        "127.0.0.1:8080/models/trec-ft/predict")),
    HUB,
]
