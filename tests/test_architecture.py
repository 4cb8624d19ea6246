"""The layout's rules, checked on the source (docs/ARCHITECTURE.md explains them): layers import only
downwards, files stay a few hundred lines, functions stay readable."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "headstart"

# What each top-level package may import from headstart (besides itself). docs/ARCHITECTURE.md, "Layers".
MAY_IMPORT = {
    "core": set(),
    "data": {"core"},
    "bases": {"core"},
    "engine": {"core", "data", "bases"},
    "llm": {"core", "data", "bases", "engine"},
    "transfer": {"core", "data", "bases", "engine"},
    "methods": {"core", "data", "bases", "engine", "llm"},
    "bundle": {"core", "data", "bases", "engine", "llm", "methods"},
    "tasks": {"core", "data", "bases", "engine", "llm", "methods", "transfer", "bundle"},
    "continual": {"core", "data", "bases", "engine", "llm", "methods", "transfer", "bundle", "tasks"},
    "combine": {"core", "data", "bases", "engine", "llm", "methods", "transfer", "bundle", "tasks", "continual"},
    "api": {"core", "data", "bases", "engine", "llm", "methods", "transfer", "bundle", "tasks", "continual",
            "combine"},
    "experiments": {"core", "data", "bases", "engine", "llm", "methods", "transfer", "bundle", "tasks", "api"},
    "hub": {"core", "data", "bases", "engine", "llm", "methods", "bundle"},
    "serve": {"core", "data", "bases", "engine", "llm", "methods", "transfer", "bundle", "tasks", "hub"},
}
TOP_LEVEL_OK = {"__init__", "__main__", "cli"}  # the package face and the CLI may use every layer


def imported_packages(path: Path) -> set[str]:
    """Top-level headstart packages that `path` imports (relative or absolute imports)."""
    rel = path.relative_to(SRC).with_suffix("").parts
    package = list(rel[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if target:
                out.add(target[0])
            else:  # `from .. import x`: a subpackage, or a name of the package face
                out.update(a.name if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists() or a.name == "__version__"
                           else "__init__"
                           for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("headstart."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("headstart."))
    return out


def test_layers_import_only_downwards():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        layer = path.relative_to(SRC).parts[0].removesuffix(".py")
        if layer in TOP_LEVEL_OK:
            continue
        assert layer in MAY_IMPORT, f"{path}: a new top-level package or module; give it a layer here and in the docs"
        for target in imported_packages(path) - {layer, "__version__"}:
            if target not in MAY_IMPORT[layer]:
                wrong.append(f"{path.relative_to(SRC)} ({layer}) imports {target}")
    assert not wrong, "layer rule broken:\n" + "\n".join(wrong)


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{path.relative_to(SRC)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 85:
                long_functions.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not long_files, long_files
    assert not long_functions, long_functions
