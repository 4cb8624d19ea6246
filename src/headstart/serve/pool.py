"""One loaded base per (base name, weights sha256), shared by every specialist over it.

What a specialist adds to its base decides how it shares it:
- a head on the untouched base (probe, prototype, zeroshot): `bundle.commands.load(folder, base=shared)`;
- a LoRA adapter + head (lora, setfit with lora): its adapter is injected into the shared base under its
  own name (PEFT). A batch mixing specialists runs the base once with PEFT's per-sample `adapter_names`
  ("__base__" for head-only rows); a batch of one adapter selects it with `set_adapter`. Adapter selection
  and the forward happen under the base's lock, so two requests never see each other's adapter. At most
  `max_adapters` adapters, and at most `adapter_memory_mb` of their weights, stay injected per base; the
  least recently used one is deleted and reloaded from its bundle on its next request;
- a generator (sft/dpo adapter on a causal LM): `LMSpecialist.load(folder, base=shared)`, run under the lock;
- anything that changes the base's weights (finetune, scratch, adabn, qlora) gets a base of its own.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from ..bases.image import feature_view_of
from ..bundle.specialist import reraise_as_bundle_error
from ..core.errors import BundleError
from .limits import DEFAULT_MAX_ADAPTERS


class SharedBase:
    """A loaded base, its lock, and the LoRA adapters injected into it (by name, least recently used first)."""

    def __init__(self, key: tuple[str, str], backbone: Any, max_adapters: int | None = None,
                 adapter_memory_mb: float | None = None):
        self.key = key
        self.backbone = backbone
        self.lock = threading.RLock()
        """Held around adapter selection + forward: PEFT's active adapter is state of the shared modules."""
        self.peft = None
        """The PeftModel wrapping `backbone` once a LoRA classifier joins (adapters live in its modules)."""
        self.max_adapters = max_adapters
        self.adapter_memory_mb = adapter_memory_mb
        self.loaded: OrderedDict[str, Path] = OrderedDict()
        self.adapter_bytes: dict[str, int] = {}
        """Bytes of each loaded adapter's weights in the shared modules."""
        self._lora_layers: list[Any] | None = None
        self._selected: str | None = None
        """The adapter `_select` last made active (None: unknown, select again)."""
        self.known: dict[str, Path] = {}
        self.batcher = None
        """One MicroBatcher for every specialist sharing this base: their requests share one base forward."""
        self.generator_models: list[Any] = []
        """PeftModels of generators sharing this (causal-LM) base: their adapters sit in its modules too."""
        self.loads = 0
        """Adapter loads so far, reloads after eviction included."""

    # ---- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter_dir: Path) -> None:
        """Register a LoRA adapter (loaded now, and again whenever it is needed after an eviction)."""
        with self.lock:
            self.known[name] = adapter_dir
            self._ensure_loaded(name)

    def _ensure_loaded(self, name: str, keep: set[str] = frozenset()) -> None:
        """Inject adapter `name` if it is not, evicting least recently used ones over the budget (never one
        in `keep`: the batch being run needs them; the budget then gives way until the next load)."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        from peft import PeftModel

        folder = str(self.known[name])
        with warnings.catch_warnings():  # peft warns when a second adapter joins modules that hold one
            warnings.simplefilter("ignore")
            if self.peft is None:
                self.backbone.name_or_path = self.backbone.info.name
                self.peft = PeftModel.from_pretrained(self.backbone, folder, adapter_name=name)
            else:
                self.peft.load_adapter(folder, adapter_name=name)
        if self.backbone.kind == "image":  # PEFT's new convs are NCHW; image bases run channels_last
            self.peft.to(memory_format=torch.channels_last)
        self.peft.eval()
        self._list_lora_layers()  # the new adapter may target modules the others do not
        self.loaded[name] = self.known[name]
        self.adapter_bytes[name] = sum(p.numel() * p.element_size() for key, p in self.peft.named_parameters()
                                       if f".{name}." in key)
        self.loads += 1
        while self._over_budget():
            evicted = next((n for n in self.loaded if n != name and n not in keep), None)
            if evicted is None:
                break
            del self.loaded[evicted]
            self.adapter_bytes.pop(evicted)
            with warnings.catch_warnings():  # "adapter X was active, now Y": the next run selects its own
                warnings.simplefilter("ignore")
                self.peft.delete_adapter(evicted)
            self._selected = None

    def _over_budget(self) -> bool:
        """More adapters loaded than `max_adapters`, or their weights over `adapter_memory_mb`."""
        too_many = self.max_adapters is not None and len(self.loaded) > self.max_adapters
        too_big = self.adapter_memory_mb is not None and \
            sum(self.adapter_bytes.values()) > self.adapter_memory_mb * 1024 * 1024
        return too_many or too_big

    def exclusive(self, work: Callable[[], Any]) -> Any:
        """`work()` alone on this base (generators select their own adapter inside)."""
        with self.lock, torch.inference_mode():
            return work()

    def classify_shared(self, pairs: list[tuple["ClassifierRunner", Any]]) -> list[torch.Tensor]:
        """Probabilities for (specialist, input) pairs of specialists sharing this base (head-only or LoRA):
        one base forward for the inputs, each row through its own adapter (PEFT's per-sample `adapter_names`;
        "__base__" for head-only ones), then each specialist's head on its rows. More distinct adapters than
        `max_adapters` are run in turns, so a batch never evicts an adapter it still needs."""
        out: list[Any] = [None] * len(pairs)
        with self.lock, torch.inference_mode():
            for names in self._adapter_turns([runner.adapter for runner, _ in pairs]):
                index = [i for i, (runner, _) in enumerate(pairs) if runner.adapter in names]
                features = self._features([pairs[i][1] for i in index], [pairs[i][0].adapter for i in index])
                rows: dict[int, tuple[ClassifierRunner, list[int]]] = {}
                for at, i in enumerate(index):
                    rows.setdefault(id(pairs[i][0]), (pairs[i][0], []))[1].append(at)
                for runner, where in rows.values():
                    probs = runner.model.classify(features[where]).float().softmax(-1)
                    for row, at in zip(probs, where):
                        out[index[at]] = row
        return out

    def _adapter_turns(self, adapters: list[str | None]) -> list[set[str | None]]:
        distinct = list(dict.fromkeys(adapters))
        named = [a for a in distinct if a is not None]
        size = min(self.max_adapters or len(named), self._adapters_in_memory_budget(named)) or 1
        turns = [set(named[i:i + size]) for i in range(0, len(named), size)] or [set()]
        if None in distinct:
            turns[0].add(None)
        return turns

    def _adapters_in_memory_budget(self, named: list[str]) -> int:
        """How many adapters fit `adapter_memory_mb` at once, sized as the largest loaded one (all of them
        when there is no memory budget or nothing is loaded yet to size them by)."""
        if self.adapter_memory_mb is None or not self.adapter_bytes:
            return max(len(named), 1)
        largest = max(self.adapter_bytes.values())
        return max(int(self.adapter_memory_mb * 1024 * 1024 // largest), 1)

    def _features(self, items: list[Any], adapters: list[str | None]) -> torch.Tensor:
        """The body's features [N, D], row i through adapter `adapters[i]` (None: the bare base). Lock held."""
        batch = self.backbone.collate(items, False)
        distinct = set(adapters)
        if distinct == {None} and self.peft is None:
            return self.run(None, lambda: self.backbone(**batch))
        for name in distinct - {None}:
            self._ensure_loaded(name, keep=distinct)
        if len(distinct) == 1 and None not in distinct:
            self._select(adapters[0])
            return self.peft(**batch)
        # Head-only rows go through "__base__" here too: PEFT's disable_adapter() visits every module twice
        # per call (measured with 10 adapters loaded: 22.6 ms per one-question request against 11.7).
        return self.peft(**batch, adapter_names=[a or "__base__" for a in adapters])

    def _select(self, name: str) -> None:
        """Make `name` the active adapter. PEFT's set_adapter walks every module and flips requires_grad on
        every adapter's weights (5.5 ms per switch with 10 adapters loaded on minilm-l6), so it is skipped
        when `name` is active already, and otherwise only the LoRA layers' active-adapter field is set,
        which is all a forward reads. Generators sharing these modules set their own adapter there behind
        this PeftModel's back, and auxiliary wrappers (modules_to_save) keep state of their own: with
        either, PEFT's set_adapter runs."""
        if self.generator_models or self._lora_layers is None:
            self.peft.set_adapter(name)
            self._selected = None
        elif self._selected != name:
            for layer in self._lora_layers:
                layer._active_adapter = [name]
            self.peft.active_adapter = self.peft.base_model.active_adapter = name
            self._selected = name

    def _list_lora_layers(self) -> None:
        """Cache the shared modules' LoRA layers for `_select` (None: PEFT's set_adapter is needed)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._selected = None  # adapters came or went: PEFT may have moved the active one
        modules = list(self.peft.modules())
        plain = not any(isinstance(m, AuxiliaryTrainingWrapper) or getattr(m, "merged", False) for m in modules)
        self._lora_layers = [m for m in modules if isinstance(m, BaseTunerLayer)] if plain else None

    def drop_generator(self, model: Any) -> None:
        """Forget a generator sharing this base: its adapter leaves the shared modules (its weights are freed)
        and its PeftModel the list. Other generators select their own adapter before each use."""
        with self.lock:
            for name in list(getattr(model, "peft_config", {})):
                model.delete_adapter(name)
            self.generator_models = [m for m in self.generator_models if m is not model]  # last: "done"

    def run(self, adapter: str | None, work: Callable[[], Any]) -> Any:
        """`work()` with adapter `adapter` active (None: the bare base, every adapter off), under the lock."""
        with self.lock, torch.inference_mode():
            # Any wrapper over these modules switches every LoRA layer in them off (PEFT's flag is per layer).
            wrapper = self.peft if self.peft is not None else next(iter(self.generator_models), None)
            if wrapper is None:
                return work()
            if adapter is None:
                with wrapper.disable_adapter():
                    return work()
            self._ensure_loaded(adapter)
            self._select(adapter)
            return work()


class ClassifierRunner:
    """Runs one classifier: probabilities and body features, on its shared (or own) base."""

    def __init__(self, model: Any, classes: list[str], base: SharedBase, adapter: str | None, shares: str):
        self.model = model.eval()
        self.classes = classes
        self.base = base
        self.adapter = adapter
        self.shares = shares
        """How it sits on its base: "head" (untouched shared base), "lora" (adapter in the shared base), "own"."""

    def probabilities(self, items: list[Any]) -> torch.Tensor:
        """Class probabilities [N, C] (items: strings or PIL images, as the base takes)."""
        def forward() -> torch.Tensor:
            return self.model(**self.model.collate(items, False)).float().softmax(-1)
        return self.base.run(self.adapter, forward)

    def features(self, texts: list[str]) -> torch.Tensor:
        """What the head reads: the body's features [N, D] (the base, with this specialist's adapter if any)."""
        def forward() -> torch.Tensor:
            return self.model.backbone(**self.model.collate(texts, False)).float()
        return self.base.run(self.adapter, forward)


class BasePool:
    """Loads each base once and hands out runners over it.

    >>> pool = BasePool(max_adapters=8)
    >>> runner = pool.classifier(Path("runs/trec-lora"), manifest)
    >>> runner.probabilities(["Who wrote Hamlet ?"])
    """

    def __init__(self, max_adapters: int | None = DEFAULT_MAX_ADAPTERS, adapter_memory_mb: float | None = None):
        self.max_adapters = max_adapters
        """Adapters kept per base (None: no budget)."""
        self.adapter_memory_mb = adapter_memory_mb
        """MB of adapter weights kept per base (None: no budget)."""
        self.bases: dict[tuple[str, str], SharedBase] = {}
        self._names = 0

    def shared_base(self, manifest: dict[str, Any]) -> SharedBase:
        from ..bases import load_base

        key = (manifest["base"]["name"], manifest["base"].get("sha256", ""))
        if key not in self.bases:
            self.bases[key] = SharedBase(key, load_base(key[0]), self.max_adapters, self.adapter_memory_mb)
        return self.bases[key]

    def classifier(self, folder: Path, manifest: dict[str, Any], head: str | None = None) -> ClassifierRunner:
        """A runner for the classifier bundle `folder` (with head `head`, in a bundle with a head per task),
        sharing its base when the bundle allows."""
        from ..bundle.commands import load

        way = _sharing(folder, manifest)
        if way != "own":
            base = self.shared_base(manifest)
            if _preprocessing_matches(manifest, base.backbone):
                if way == "head":
                    spec = load(folder, base=base.backbone, head=head)
                    return ClassifierRunner(spec.model, spec.classes, base, None, "head")
                return self._lora_classifier(folder, manifest, base, head)
        spec = load(folder, head=head)  # changes its base, or was trained at another image size than it runs at
        return ClassifierRunner(spec.model, spec.classes, SharedBase(("own", str(folder)), spec.model.base), None, "own")

    def _lora_classifier(self, folder: Path, manifest: dict[str, Any], base: SharedBase,
                         head: str | None) -> ClassifierRunner:
        from ..bundle.classifier import Specialist, head_state, pick_head
        from ..bundle.format import check_base, read_trained
        from ..methods.base import SpecialistModel

        check_base(manifest, base.backbone.info.sha256)
        Specialist.vet_adapter_folders(folder, manifest)
        head, classes = pick_head(folder, manifest, head)
        stored = head_state(folder, manifest, head, read_trained(folder))
        adapter_dir = Specialist.adapter_folder(folder, manifest)
        # Two heads of one bundle share its adapter: it is injected once.
        name = next((n for n, d in base.known.items() if d == adapter_dir), None)
        if name is None:
            self._names += 1
            name = f"a{self._names}"
            try:
                base.add_adapter(name, adapter_dir)
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
                raise reraise_as_bundle_error(folder, f"its adapter {adapter_dir.name}/ does not fit its base", e) from None
        model = SpecialistModel(base.peft, len(classes), normalize="center" in stored)
        _copy_head(folder, model, stored)
        return ClassifierRunner(model, classes, base, name, "lora")

    def generator(self, folder: Path, manifest: dict[str, Any]) -> tuple[Any, SharedBase]:
        """(LMSpecialist, the base it runs on): a shared causal LM unless the bundle quantises its own."""
        from ..bundle.commands import load

        if manifest["method"]["name"] == "qlora":  # runs on its own 4-bit copy of the base
            spec = load(folder)
            return spec, SharedBase(("own", str(folder)), spec.model)
        base = self.shared_base(manifest)
        spec = load(folder, base=base.backbone)
        base.generator_models.append(spec.model)
        return spec, base

    def stats(self) -> dict[str, Any]:
        """Loaded bases and adapters (the /ready route and the benchmark report these)."""
        return {"bases": [{"name": k[0], "sha256": k[1], "adapters_loaded": len(b.loaded),
                           "adapters_known": len(b.known), "adapter_loads": b.loads,
                           "adapter_mb": round(sum(b.adapter_bytes.values()) / 2**20, 3)} for k, b in self.bases.items()]}


def _copy_head(folder: Path, model: Any, stored: dict[str, torch.Tensor]) -> None:
    """The bundle's head (and `center`, for cosine heads) into `model`; every name and shape must match."""
    own = {"head." + k: v for k, v in model.head.state_dict().items()}
    if "center" in stored:
        own["center"] = model.center
    problem = None
    if set(stored) != set(own):
        problem = f"it stores {sorted(stored)}, the head needs {sorted(own)}"
    else:
        problem = next((f"{k} is {tuple(v.shape)}, expected {tuple(own[k].shape)}" for k, v in stored.items()
                        if v.shape != own[k].shape), None)
    if problem:
        raise BundleError(f"{folder}: its head does not fit its base ({problem})")
    with torch.no_grad():
        for key, value in stored.items():
            own[key].copy_(value)


def _sharing(folder: Path, manifest: dict[str, Any]) -> str:
    """"head", "lora" or "own": how a classifier bundle can sit on a shared base."""
    from ..bundle.format import read_trained
    from ..methods.registry import make_method

    method_name = manifest["method"]["name"]
    try:
        method = make_method(method_name, **manifest["method"]["config"])
    except Exception:  # the load itself reports a broken method config in one line
        return "own"
    adapters = manifest.get("adapters", {})
    if method.frozen_base and not adapters:
        return "head"
    lora = method_name == "lora" or (method_name == "setfit" and manifest["method"]["config"].get("lora"))
    if lora and len(adapters) == 1:
        stored = read_trained(folder)
        if all(k.startswith("head.") or k == "center" for k in stored):
            return "lora"
    return "own"


def _preprocessing_matches(manifest: dict[str, Any], backbone: Any) -> bool:
    """Whether the shared base already runs at the bundle's input size and feature view."""
    pre, now = manifest.get("preprocessing", {}), backbone.info.preprocessing
    if backbone.kind != "image":
        return True
    size = pre.get("input_size")
    return (not size or size == now.get("input_size")) and feature_view_of(pre) == feature_view_of(now)
