"""Continual-learning strategies: their configs, how a spec string names them, and the engine hooks.

A strategy spec joins names with "+": `replay+lwf`. Each name has a config; the penalties and the
distillation are engine hooks (`engine/trainer.Hook`) whose `extra_loss` is added to the step loss;
replay is a data rule (the reservoir lives in `continual/memory.py`).

- `naive`: plain continued training.
- `l2sp` (Li et al. 2018): weight/2 * sum (theta - theta_prev)^2 over the params of the previous version.
- `ewc` (online EWC, Schwarz et al. 2018): the same, each square weighted by the diagonal Fisher
  (`continual/fisher.py`).
- `lwf` (Li & Hoiem 2016): weight * T^2 * KL(previous version's softened outputs || the student's),
  on the old classes only.
- `replay`: a bounded class-balanced reservoir of earlier nights' examples joins the training split.
- `joint`: retrain from the base on everything the memory holds (a benchmark's upper bound).

>>> configs = parse_strategies("replay+lwf", lwf_temperature=3.0)
>>> sorted(configs), configs["lwf"].temperature
(['lwf', 'replay'], 3.0)
>>> auto_strategy("class", "features")[0]
'replay'
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.config import Config
from ..core.errors import ConfigError
from ..engine.trainer import Hook, RunState

STRATEGIES = ("naive", "l2sp", "ewc", "lwf", "replay", "joint")
"""Every strategy name a spec may use."""

ALONE = ("naive", "joint")
"""Strategies that cannot be combined with another."""

SCENARIOS = ("domain", "class", "unlabelled", "generative")
STORES = ("features", "refs", "raw", "none")


@dataclass
class NaiveConfig(Config):
    """Plain continued training on the night's data: no penalty, no memory."""


@dataclass
class JointConfig(Config):
    """Retrain from the base on every example the memory holds (needs an unbounded store)."""


@dataclass
class L2SPConfig(Config):
    """L2-SP: pull every parameter of the previous version back towards its previous value."""

    weight: float = 0.01
    """alpha in weight/2 * sum (theta - theta_prev)^2 -- a sum of squares, not a mean (Li et al. 2018)."""

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


@dataclass
class EWCConfig(Config):
    """Online EWC: the L2-SP pull weighted by each parameter's diagonal Fisher information."""

    weight: float = 100.0
    """lambda in weight/2 * sum F * (theta - theta_prev)^2."""
    decay: float = 0.9
    """gamma of online EWC: F_t = decay * F_(t-1) + F_new (1: every night counts forever)."""
    max_examples: int = 200
    """Examples (a seeded sample of the night) whose per-example gradients estimate the Fisher."""

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not 0 <= self.decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        if self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {self.max_examples}")


@dataclass
class LwFConfig(Config):
    """Learning without Forgetting: keep the previous version's outputs on the new data."""

    weight: float = 1.0
    """Factor on T^2 * KL(teacher || student) added to the cross-entropy."""
    temperature: float = 2.0
    """Softmax temperature T of both distributions (Hinton et al.: 2 is the usual choice)."""

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class ReplayConfig(Config):
    """Experience replay: a class-balanced reservoir of earlier nights' examples joins each night's training."""

    size: int = 1000
    """Examples the reservoir keeps in all (classes share it evenly)."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


CONFIGS: dict[str, type[Config]] = {
    "naive": NaiveConfig, "l2sp": L2SPConfig, "ewc": EWCConfig, "lwf": LwFConfig,
    "replay": ReplayConfig, "joint": JointConfig,
}

_WEIGHTED = ("l2sp", "ewc", "lwf")  # the strategies whose `weight` a retry scales


def option_names() -> list[str]:
    """Every option `parse_strategies` accepts (`<strategy>_<field>`), e.g. for CLI flags."""
    return [f"{name}_{f.name}" for name in STRATEGIES for f in dataclasses.fields(CONFIGS[name])]


def parse_strategies(spec: str, **options: Any) -> dict[str, Config]:
    """{name: config} of a spec such as "replay+lwf", in spec order; `options` are `<strategy>_<field>`
    values (`lwf_weight=2.0`), a None option is ignored. Raises ConfigError on an unknown name or option,
    a repeated name, an option for a strategy not in the spec, or naive/joint combined with another.

    >>> parse_strategies("l2sp", l2sp_weight=0.1)
    {'l2sp': L2SPConfig(weight=0.1)}
    """
    names = [part.strip().lower() for part in str(spec).split("+")]
    if not spec or any(not n for n in names):
        raise ConfigError(f"empty strategy in {spec!r}: use names joined by '+' from {', '.join(STRATEGIES)}")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)} (joined by '+')")
    if len(set(names)) != len(names):
        raise ConfigError(f"strategy {spec!r} names one strategy twice")
    alone = [n for n in names if n in ALONE]
    if alone and len(names) > 1:
        raise ConfigError(f"{alone[0]} cannot be combined with another strategy (got {spec!r})")
    fields: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in options.items():
        if value is None:
            continue
        name, _, field = key.partition("_")
        if name not in CONFIGS or key not in option_names():
            raise ConfigError(f"unknown strategy option {key!r}: choose from {', '.join(option_names())}")
        if name not in fields:
            raise ConfigError(f"option {key!r} given, but the strategy is {spec!r} (no {name})")
        fields[name][field] = value
    return {n: CONFIGS[n].from_json(fields[n]) for n in names}


def strategy_spec(configs: dict[str, Config]) -> str:
    """The spec string of parsed configs: `strategy_spec(parse_strategies(s)) == s` for a normalised s."""
    return "+".join(configs)


def scaled(configs: dict[str, Config], strength: float) -> dict[str, Config]:
    """Copies with every penalty and distillation weight multiplied by `strength` (the forgetting guard's
    retry uses 10); `configs` is unchanged.

    >>> scaled({"l2sp": L2SPConfig(weight=0.01)}, 10)["l2sp"].weight
    0.1
    """
    if not strength >= 0:
        raise ConfigError(f"strength must be >= 0, got {strength}")
    return {name: dataclasses.replace(cfg, weight=cfg.weight * strength) if name in _WEIGHTED
            else dataclasses.replace(cfg) for name, cfg in configs.items()}


_REPLAY = "replay keeps examples of earlier nights in every batch"
_NO_STORE = "nothing of earlier nights may be kept (store none)"
_AUTO = {  # (scenario, a store to replay from?) -> (spec, why)
    ("class", True): ("replay", f"new labels appear: {_REPLAY}, so the old classes keep competing with the new "
                               "ones (on banking77 it matched joint retraining; adding LwF lost 3 points)"),
    ("class", False): ("lwf+ewc", f"new labels appear and {_NO_STORE}: LwF keeps the old outputs on the new data "
                                  "and EWC protects the weights the old classes relied on"),
    ("domain", True): ("replay+l2sp", f"the labels are known and the inputs drift: {_REPLAY} and L2-SP keeps the "
                                      "weights near the last version"),
    ("domain", False): ("ewc", f"the labels are known, the inputs drift and {_NO_STORE}: EWC holds the weights that "
                               "mattered for earlier nights and frees the others"),
    ("unlabelled", True): ("replay+l2sp", f"the labels are the last version's own guesses: {_REPLAY} (with their "
                                          "true labels) and L2-SP keeps the model near the version that made the "
                                          "guesses, so it cannot drift on its own mistakes"),
    ("unlabelled", False): ("l2sp", "the labels are the last version's own guesses: L2-SP keeps the model near the "
                                    "version that made them, so it cannot drift on its own mistakes"),
    ("generative", True): ("replay+l2sp", f"a generator forgets its old answers quickly: {_REPLAY} and L2-SP keeps "
                                          "the weights near the last version"),
    ("generative", False): ("l2sp", f"a generator forgets its old answers quickly and {_NO_STORE}: L2-SP keeps the "
                                    "weights near the last version"),
}


def auto_strategy(scenario: str, store: str) -> tuple[str, str]:
    """(spec, one-sentence why) for a scenario (`domain`, `class`, `unlabelled`, `generative`) and what the
    memory may keep (`features`, `refs`, `raw`, `none`: replay needs a store).

    >>> auto_strategy("domain", "none")[0]
    'ewc'
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}: choose from {', '.join(SCENARIOS)}")
    if store not in STORES:
        raise ConfigError(f"unknown replay store {store!r}: choose from {', '.join(STORES)}")
    return _AUTO[(scenario, store != "none")]


def without_weight_decay(param_groups: list[dict], params) -> list[dict]:
    """The groups with `params` moved into copies of their group with weight_decay 0: weight decay pulls
    towards zero, the anchor penalty towards the previous weights -- together they would fight.
    Other group settings (lr) are kept; empty groups are dropped.

    >>> groups = without_weight_decay([{"params": [w, b], "lr": 0.1, "weight_decay": 0.01}], [w])
    >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
    [(1, 0.01), (1, 0.0)]
    """
    anchored = {id(p) for p in (params.values() if isinstance(params, dict) else params)}
    out: list[dict] = []
    for group in param_groups:
        keep = [p for p in group["params"] if id(p) not in anchored]
        moved = [p for p in group["params"] if id(p) in anchored]
        if keep:
            out.append({**group, "params": keep})
        if moved:
            out.append({**group, "params": moved, "weight_decay": 0.0})
    return out


def _check_rows(name: str, param: torch.Tensor, old: torch.Tensor) -> None:
    """The anchor must be the param itself, or its first rows (a head that gained classes)."""
    if old.dim() != param.dim() or old.shape[1:] != param.shape[1:] or (old.dim() and old.shape[0] > param.shape[0]):
        raise ValueError(f"{name}: anchor shape {tuple(old.shape)} does not fit parameter {tuple(param.shape)}")


class AnchorPenalty(Hook):
    """weight/2 * sum importance * (theta - anchor)^2 over the params with an anchor (L2-SP without
    `importance`, EWC with the diagonal Fisher). For a param whose first dimension grew (a class-incremental
    head: [C_new, D] against an anchor [C_old, D]) only the first C_old rows are pulled: new classes are free.

    >>> hook = AnchorPenalty(dict(model.named_parameters()), anchor, weight=0.01)
    >>> train(model, ..., hooks=[hook])
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], anchor: dict[str, torch.Tensor],
                 importance: dict[str, torch.Tensor] | None = None, weight: float = 0.01, name: str | None = None):
        self.name = name or ("ewc" if importance is not None else "l2sp")
        self.weight = float(weight)
        self.terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
        for key, param in params.items():
            if key not in anchor:
                continue  # a param new this version (e.g. a fresh adapter): nothing to keep
            old = anchor[key].detach()
            _check_rows(key, param, old)
            imp = None
            if importance is not None:
                if key not in importance:
                    continue  # EWC without a Fisher for it: no information that it mattered
                imp = importance[key].detach()
                if imp.shape != old.shape:
                    raise ValueError(f"{key}: importance shape {tuple(imp.shape)} != anchor {tuple(old.shape)}")
            self.terms.append((param, old, imp))
        self._placed = False

    def _place(self) -> None:
        """Anchors and importances moved once to their param's device and dtype (the engine moves the
        model after the hook is built, so this runs on the first step, not in __init__)."""
        self.terms = [(p, a.to(p.device, p.dtype), None if i is None else i.to(p.device, p.dtype))
                      for p, a, i in self.terms]
        self._placed = True

    def penalty(self) -> torch.Tensor:
        """The penalty term (a scalar with a graph to the params); 0 without anchored params."""
        if not self._placed or (self.terms and self.terms[0][1].device != self.terms[0][0].device):
            self._place()
        total = None
        for param, old, imp in self.terms:
            current = param[:old.shape[0]] if old.dim() and old.shape[0] != param.shape[0] else param
            sq = (current - old).square()
            term = (sq * imp if imp is not None else sq).sum(dtype=torch.float32)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.weight * total

    def extra_loss(self, run: RunState, batch) -> torch.Tensor | None:
        if not self.terms or self.weight == 0:
            return None
        return self.penalty()


class Distillation(Hook):
    """LwF: weight * T^2 * KL(softmax(teacher/T) || softmax(student[:, :C_old]/T)), batch mean.

    The step loss writes this share's `logits` ([b, C]) and `idx` (indices into the training split) into
    `outputs` (`methods.training.cross_entropy_step(..., outputs=outputs)`); `teacher_logits[idx]` are
    the previous version's logits ([N_train, C_old]), computed once before training. A grown head
    (C >= C_old) is distilled on its first C_old columns only: the new classes have no teacher.
    """

    name = "lwf"

    def __init__(self, outputs: dict, teacher_logits: torch.Tensor, weight: float = 1.0, temperature: float = 2.0):
        if teacher_logits.dim() != 2:
            raise ValueError(f"teacher_logits must be [N, C_old], got shape {tuple(teacher_logits.shape)}")
        self.outputs, self.teacher = outputs, teacher_logits.detach().float()
        self.weight, self.temperature = float(weight), float(temperature)

    def loss(self, student_logits: torch.Tensor, idx) -> torch.Tensor:
        """The distillation term for a share's logits and their indices into the training split."""
        old = self.teacher.shape[1]
        if student_logits.shape[1] < old:
            raise ValueError(f"the student has {student_logits.shape[1]} classes, fewer than the teacher's {old}")
        t = self.temperature
        if self.teacher.device != student_logits.device:  # moved once, not every step
            self.teacher = self.teacher.to(student_logits.device)
        teacher = self.teacher[torch.as_tensor(list(idx), dtype=torch.long, device=self.teacher.device)]
        log_student = F.log_softmax(student_logits[:, :old].float() / t, dim=-1)
        log_teacher = F.log_softmax(teacher / t, dim=-1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return self.weight * t * t * kl

    def extra_loss(self, run: RunState, batch) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        if "logits" not in self.outputs or "idx" not in self.outputs:
            raise RuntimeError("Distillation needs a step loss that fills outputs['logits'] and outputs['idx']")
        idx = self.outputs["idx"]
        if isinstance(batch, list) and list(batch) != list(idx):
            raise RuntimeError("Distillation: the step's outputs are not this batch's (stale outputs dict)")
        return self.loss(self.outputs["logits"], idx)
