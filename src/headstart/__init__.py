"""headstart: turn a pretrained foundation model into a specialist for one niche job, on a laptop.

    import headstart
    spec = headstart.fit("../shared/data/hymenoptera", base="efficientnet-lite0", method="probe")
    spec.predict(["ant.jpg"]); spec.save("runs/ants"); headstart.load("runs/ants")

`import headstart` is light: each public name is imported on first use (PEP 562), so the command
line and `headstart.list_bases()` do not pay for torch.
"""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT whenever it is installed) warns on every import that it cannot fetch
# an optional CPU kernel from the Hugging Face hub; headstart works offline and does not use it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "fit": ".api", "load": ".api", "evaluate": ".api",
    "update": ".api", "history": ".api", "rollback": ".api", "diff": ".api",
    "merge": ".combine.merge", "federate": ".combine.federated.run", "adapt": ".experiments.adapt", "run_shots": ".experiments.shots", "rank": ".transfer.rank",
    "serve": ".serve.app",
    "corrupt_folder": ".data.corrupt", "load_dataset": ".data",
    "list_bases": ".bases", "load_base": ".bases", "list_methods": ".methods.registry",
    "Specialist": ".bundle.classifier", "HeadstartError": ".core.errors",
}
"""Public name -> the module that defines it."""

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import diff, evaluate, fit, history, load, rollback, update  # noqa: F401
    from .bases import list_bases, load_base  # noqa: F401
    from .bundle.classifier import Specialist  # noqa: F401
    from .combine.federated.run import federate  # noqa: F401
    from .combine.merge import merge  # noqa: F401
    from .core.errors import HeadstartError  # noqa: F401
    from .data import load_dataset  # noqa: F401
    from .data.corrupt import corrupt_folder  # noqa: F401
    from .experiments.adapt import adapt  # noqa: F401
    from .experiments.shots import run_shots  # noqa: F401
    from .methods.registry import list_methods  # noqa: F401
    from .serve.app import serve  # noqa: F401
    from .transfer.rank import rank  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
