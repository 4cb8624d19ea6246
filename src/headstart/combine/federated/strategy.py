"""Flower's strategies, configured for specialists: FedAvg or FedProx, optionally wrapped in Flower's
server-side DP (clip each client's update, add Gaussian noise to the mean), with the privacy spent
counted by Opacus's RDP accountant.

The server evaluates the global specialist on the held-out split after every round (Flower's
centralised evaluation) and keeps the latest global tensors for the final bundle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ...core.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox")


@dataclass
class Plan:
    """Everything the server decides: the recipe every client trains, and how rounds run."""

    recipe: dict[str, Any]
    """base, method, options, classes, seed: sent to every client each round."""
    clients: int
    rounds: int
    local_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    fraction: float = 1.0
    """Share of the clients sampled each round."""
    clip: float | None = None
    """DP: clip every client's update (its change of the trained tensors) to this L2 norm."""
    noise: float = 0.0
    """DP: Gaussian noise std on the summed updates, as a multiple of `clip` (the noise multiplier)."""
    delta: float = 1e-5
    head_from_statistics: bool = False
    """An extra first round in which clients send class statistics and the server starts the head as
    their linear discriminant (see warmup.py); the `rounds` training rounds follow."""

    @property
    def per_round(self) -> int:
        return max(1, round(self.fraction * self.clients))

    @property
    def total_rounds(self) -> int:
        """Flower's rounds: the statistics round (if any) + the training rounds."""
        return self.rounds + int(self.head_from_statistics)

    def stage(self, server_round: int) -> str:
        return "statistics" if self.head_from_statistics and server_round == 1 else "train"


def build_strategy(plan: Plan, initial: list, evaluate: Callable[[list], float], log: RoundLog,
                   head_from: Callable[[list], list] | None = None):
    """The Flower strategy for `plan`, starting from `initial` arrays; `evaluate(arrays) -> accuracy` on the
    server's held-out split after every round, recorded in `log`. With `plan.head_from_statistics`,
    `head_from(pooled statistics) -> arrays` makes the first round's result."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg, FedProx

    if plan.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {plan.strategy!r}; choose {' or '.join(STRATEGIES)}")
    recipe = json.dumps(plan.recipe, sort_keys=True)

    def fit_config(server_round: int) -> dict[str, Any]:
        # "round" counts training rounds (the clients' learning-rate decay runs over them)
        return {"recipe": recipe, "local_epochs": plan.local_epochs, "seed": int(plan.recipe["seed"]),
                "stage": plan.stage(server_round), "round": server_round - int(plan.head_from_statistics),
                "rounds": plan.rounds}

    def central(server_round: int, arrays: list, config: dict) -> tuple[float, dict[str, Any]] | None:
        accuracy = evaluate(arrays)
        log.evaluated(server_round, arrays, accuracy)
        return 1.0 - accuracy, {"accuracy": accuracy}

    common = dict(fraction_fit=plan.fraction, fraction_evaluate=0.0, min_fit_clients=plan.per_round,
                  min_evaluate_clients=0, min_available_clients=plan.clients, evaluate_fn=central,
                  on_fit_config_fn=fit_config, on_evaluate_config_fn=fit_config,
                  initial_parameters=ndarrays_to_parameters(initial), fit_metrics_aggregation_fn=lambda results: _record(log, sum_fit_metrics(results)))
    flower_class = FedProx if plan.strategy == "fedprox" else FedAvg
    if plan.head_from_statistics:
        if head_from is None or plan.clip is not None:
            raise ConfigError("the class-statistics round needs head_from and no DP clipping")
        flower_class = type(f"HeadFirst{flower_class.__name__}", (HeadFromStatistics, flower_class), {})
        common["head_from"] = head_from
    strategy = flower_class(proximal_mu=plan.proximal_mu, **common) if plan.strategy == "fedprox" else flower_class(**common)
    if plan.clip is None:
        if plan.noise:
            raise ConfigError("noise needs a clipping norm (clip=...): noise is a multiple of the clip")
        return strategy
    from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping

    if not plan.clip > 0 or plan.noise < 0:
        raise ConfigError(f"DP needs clip > 0 and noise >= 0, got clip={plan.clip} noise={plan.noise}")
    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=plan.noise, clipping_norm=plan.clip,
                                                      num_sampled_clients=plan.per_round)


class HeadFromStatistics:
    """Mixed into a Flower strategy: round 1's example-weighted average is the pooled class statistics,
    turned into the starting tensors (the initial ones with a discriminant head) before anything else
    (evaluation, round 2) sees them."""

    def __init__(self, *args, head_from: Callable[[list], list], **kwargs):
        super().__init__(*args, **kwargs)
        self.head_from = head_from

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if server_round == 1 and parameters is not None:
            parameters = ndarrays_to_parameters(self.head_from(parameters_to_ndarrays(parameters)))
        return parameters, metrics


def _record(log: RoundLog, metrics: dict[str, Any]) -> dict[str, Any]:
    log.fit_done(metrics)
    return metrics


def sum_fit_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Bytes add up over the round's clients; the train loss is averaged weighted by examples."""
    n = sum(count for count, _ in results) or 1
    return {"bytes_up": sum(int(m.get("bytes_up", 0)) for _, m in results),
            "bytes_down": sum(int(m.get("bytes_down", 0)) for _, m in results),
            "train_loss": sum(count * float(m.get("train_loss", 0.0)) for count, m in results) / n,
            "clients": len(results)}


def epsilon(noise: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta) client-level DP budget of `rounds` Gaussian mechanisms with this noise
    multiplier, each round sampling clients at `sample_rate` (DP-FedAvg, McMahan et al. 2018), by
    Opacus's RDP accountant. Infinite without noise.

    >>> round(epsilon(1.0, 0.1, 100, 1e-5), 2) < round(epsilon(0.5, 0.1, 100, 1e-5), 2)
    True
    """
    if noise <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise, sample_rate=min(1.0, sample_rate))
    return float(accountant.get_epsilon(delta))


@dataclass
class RoundLog:
    """What the server saw, one row per round: global accuracy (round 0 = before training), the bytes
    the clients received and sent, how many took part, their mean train loss. Flower aggregates a
    round's fit metrics before it evaluates that round, so a round's fit figures wait in `pending`."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] = field(default_factory=dict)
    arrays: list | None = None
    """The latest global tensors (after the last round: the federation's result)."""
    plan: Plan | None = None
    """Names the rounds' stages (the statistics round) in the rows and progress lines."""
    say: Callable[[str], None] = lambda line: None
    """Where one progress line per round goes."""

    def fit_done(self, metrics: dict[str, Any]) -> None:
        self.pending = dict(metrics)

    def evaluated(self, server_round: int, arrays: list, accuracy: float) -> None:
        row = {"round": server_round, "accuracy": round(float(accuracy), 6), **self.pending}
        if "bytes_up" in row:
            row["bytes"] = int(row["bytes_up"]) + int(row["bytes_down"])
        stage = self.plan.stage(server_round) if self.plan is not None and server_round else "start"
        if stage == "statistics":
            row["stage"] = "head from class statistics"
            row.pop("train_loss", None)
        self.rows.append(row)
        self.pending, self.arrays = {}, arrays
        total = self.plan.total_rounds if self.plan is not None else "?"
        what = {"start": "starting model", "statistics": "head from the class statistics"}.get(stage, "trained")
        loss = f", train loss {row['train_loss']:.4f}" if "train_loss" in row else ""
        sent = f", {row['bytes'] / 1e6:.2f} MB moved" if "bytes" in row else ""
        self.say(f"  round {server_round}/{total} ({what}): accuracy {row['accuracy']:.4f}{loss}{sent}")
