"""headstart: turn a pretrained foundation model into a specialist for one niche job, on a laptop.

    import headstart
    spec = headstart.fit("../shared/data/hymenoptera", base="efficientnet-lite0", method="probe")
    spec.predict(["ant.jpg"]); spec.save("runs/ants"); headstart.load("runs/ants")
"""
__version__ = "0.1.0"

import logging  # noqa: E402

# bitsandbytes (imported by PEFT whenever it is installed) warns on every import that it cannot fetch
# an optional CPU kernel from the Hugging Face hub; headstart works offline and does not use it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .experiments.adapt import adapt  # noqa: E402
from .api import evaluate, fit, load  # noqa: E402
from .bases import list_bases, load_base  # noqa: E402
from .data.corrupt import corrupt_folder  # noqa: E402
from .data import load_dataset  # noqa: E402
from .core.errors import HeadstartError  # noqa: E402
from .methods.registry import list_methods  # noqa: E402
from .experiments.shots import run_shots  # noqa: E402
from .bundle.classifier import Specialist  # noqa: E402
from .transfer.rank import rank  # noqa: E402

__all__ = ["fit", "adapt", "rank", "corrupt_folder", "load", "evaluate", "Specialist", "load_dataset", "load_base", "list_bases", "list_methods",
           "run_shots", "HeadstartError", "__version__"]
