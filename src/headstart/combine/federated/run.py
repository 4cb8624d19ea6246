"""`federate`: many clients train one specialist together on Flower, sharing only adapter and head tensors.

    report = federate("../shared/data/banking77", clients=10, split="dirichlet:0.3", rounds=20, method="lora")
    report["accuracy"], report["bytes_per_round"], report["bundle"]

Cheap to import (the CLI reads `federate`'s signature): torch and Flower load inside the function.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from ...core.errors import ConfigError


def federate(data: "str | Path | list[str | Path] | None" = None, *, clients: int = 10, split: str = "dirichlet:0.3",
             rounds: int = 20, method: str = "lora", base: str | None = None, strategy: str = "fedavg",
             proximal_mu: float = 0.01, local_epochs: int = 1, fraction: float = 1.0, clip: float | None = None,
             noise: float = 0.0, delta: float = 1e-5, personalise: bool = False, alone: bool = False,
             server: bool = False, client: str | Path | None = None, server_address: str = "127.0.0.1:9092",
             workers: int = 1, round_timeout_s: float = 600.0, out: str | Path | None = None, seed: int = 0,
             text_column: str = "text", label_column: str = "label", progress: bool = False,
             log: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    """Train one specialist across clients that never share their examples, with Flower (FedAvg or FedProx).

    Each client trains a specialist (the method's adapter and head) on its own shard for `local_epochs`;
    only those tensors travel; the server averages them and measures the global model on the held-out
    split every round. Runs as a Flower simulation on this machine (default), as a server (`server`), or
    as one client process (`client`). The result is a normal bundle (`headstart.load`, `predict`).

    Args:
        data: Simulation: one dataset (folder or table) dealt to the clients by `split`, or several tables
            with `split="by-file"` (one client each). Server: the dataset whose test split measures the
            global model and whose labels the federation learns.
        clients: Simulation: how many clients share the data. Server: how many client processes to wait for.
        split: How the data is dealt: `iid`, `dirichlet:ALPHA` (label skew, smaller = more skewed) or
            `by-file` (one table per client).
        rounds: Federated rounds (each: clients train locally, the server aggregates).
        method: What each client trains: `lora` (adapter + head), or `finetune` (`unfreeze=0`: the head alone).
        base: The base model (default: the data kind's default, minilm-l6 for text).
        strategy: `fedavg` or `fedprox` (FedAvg + a proximal pull towards the round's global model).
        proximal_mu: FedProx's mu: weight of (mu/2)*||w - w_global||^2 in each client's loss.
        local_epochs: Passes over its shard a client makes per round.
        fraction: Share of the clients sampled each round.
        clip: Differential privacy: clip each client's update to this L2 norm (Flower's server-side DP).
        noise: Differential privacy: Gaussian noise multiplier on the clipped updates (needs `clip`); the
            report gives the (epsilon, delta) spent, by Opacus's RDP accountant.
        delta: The delta of the reported (epsilon, delta).
        personalise: Also give every client its own version: the global bundle + one local night of
            `update` on its shard (needs `out`; written to `<out>-clients/<client>`).
        alone: Also fit a specialist on each client's shard alone, measured on the same test set.
        server: Serve the rounds on `server_address` for `clients` client processes.
        client: Run one client process on this dataset, joining the server at `server_address`.
        server_address: host:port of the server, on this machine only (127.0.0.1).
        workers: Simulation: worker processes playing the clients side by side.
        round_timeout_s: Server: seconds a round waits for its clients (client: for the server to appear).
        out: Folder of the global bundle to write.
        seed: Seed of the split, the initial adapter and head, and every client's shuffling.
        text_column: The text column of tables.
        label_column: The label column of tables.
        progress: Show Flower's round logs.
        log: Where progress lines go.
        **options: The method's config fields, e.g. `r=4, lr=1e-3, batch_size=16`.

    >>> report = federate("../shared/data/trec", clients=3, split="iid", rounds=2, base="minilm-l6")
    >>> [row["round"] for row in report["rounds"]], report["bundle"]
    ([0, 1, 2], None)
    """
    t0 = time.perf_counter()
    _refuse_bad_settings(data, rounds, local_epochs, fraction, server, client, server_address, personalise, alone,
                         out, clip, noise)
    if client is not None:
        return _run_client(client, server_address, round_timeout_s, seed, text_column, label_column, progress, t0)
    from .shards import Setup
    from .strategy import Plan

    setup = Setup.build(data, clients, split, seed, text_column, label_column, server)
    recipe = {"base": base or setup.default_base(), "method": method, "options": options, "classes": setup.classes,
              "seed": seed}
    # The head starts as `fit`'s does (a probe on the base's features) unless asked otherwise: here as the
    # clients' pooled linear discriminant (warmup.py). Under DP that round would not be private: skipped.
    warm = options.get("head_init", "probe") == "probe" and clip is None
    plan = Plan(recipe=recipe, clients=setup.clients, rounds=rounds, local_epochs=local_epochs, strategy=strategy,
                proximal_mu=proximal_mu, fraction=fraction, clip=clip, noise=noise if clip is not None else 0.0,
                delta=delta, head_from_statistics=warm)
    log(f"federate: {setup.clients} clients ({split}), {rounds} rounds of {strategy}, {method} on {recipe['base']}"
        + ("; round 1 pools class statistics for the starting head" if warm else "; the head starts random"))
    where = {"server": server, "address": server_address, "workers": workers, "round_timeout_s": round_timeout_s,
             "progress": progress, "log": log}
    report = _federation(plan, setup, split, where, t0)
    if out is not None:
        report["bundle"] = str(report.pop("_specialist").save(out))
    report.pop("_specialist", None)
    _extras(report, setup, report.pop("_party"), report.pop("_initial"), alone, personalise, out, seed, log)
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    log(_summary(report))
    return report


def _refuse_bad_settings(data, rounds, local_epochs, fraction, server, client, server_address, personalise, alone,
                         out, clip, noise) -> None:
    from .simulation import check_loopback

    if server and client is not None:
        raise ConfigError("choose one role: server=True or client=DATA")
    if rounds < 1 or local_epochs < 1 or not 0 < fraction <= 1:
        raise ConfigError(f"need rounds >= 1, local_epochs >= 1, 0 < fraction <= 1; got {rounds}, {local_epochs}, {fraction}")
    if server or client is not None:
        check_loopback(server_address)
    if client is not None:
        return
    if data is None or (isinstance(data, (list, tuple)) and not data):  # the CLI passes [] when none is given
        raise ConfigError("no data: give the dataset to federate (or client=DATA to join a server)")
    if personalise and out is None:
        raise ConfigError("personalise writes each client's bundle beside the global one: give out=FOLDER")
    if server and (alone or personalise):
        raise ConfigError("alone and personalise need the clients' shards: use them in a simulation")
    if noise and clip is None:
        raise ConfigError("noise needs a clipping norm (clip=...): the noise is a multiple of the clip")


def _federation(plan, setup, split: str, where: dict[str, Any], t0: float) -> dict[str, Any]:
    """The rounds, the report and the global specialist (under private keys, taken out by `federate`)."""
    from .model import Party
    from .strategy import epsilon

    recipe = plan.recipe
    party = Party(recipe["base"], recipe["method"], setup.classes, recipe["options"], recipe["seed"])
    initial = party.get_arrays()
    rounds_log = _run_rounds(plan, setup, party, where)
    report = _report(plan, setup, party, rounds_log.rows, split, where["server"], t0)
    if plan.clip is not None:
        spent = epsilon(plan.noise, plan.per_round / plan.clients, plan.rounds, plan.delta)
        report["epsilon"] = spent if math.isfinite(spent) else None  # clipping without noise: no guarantee
        report.update(delta=plan.delta, clip=plan.clip, noise=plan.noise)
    spec = _final_bundle(party, rounds_log, setup, report, recipe["seed"])
    report["accuracy"] = float(spec.manifest["metrics"]["accuracy"])
    return {**report, "_specialist": spec, "_party": party, "_initial": initial}


def _run_rounds(plan, setup, party, where: dict[str, Any]):
    from .simulation import serve, simulate

    if where["server"]:
        return serve(plan, party, setup.test, where["address"], round_timeout_s=where["round_timeout_s"],
                     progress=where["progress"], say=where["log"])
    return simulate(plan, setup.shards, party, setup.test, workers=max(1, min(where["workers"], setup.clients)),
                    progress=where["progress"], say=where["log"])


def _report(plan, setup, party, rows, split: str, server: bool, t0: float) -> dict[str, Any]:
    from .model import payload_bytes

    trained = [r for r in rows if "bytes" in r and "stage" not in r]
    statistics = [r["bytes"] for r in rows if "bytes" in r and "stage" in r]
    return {"mode": "server" if server else "simulation", "strategy": plan.strategy, "method": plan.recipe["method"],
            "base": plan.recipe["base"], "clients": plan.clients, "split": split if not server else None,
            "rounds": rows, "accuracy_per_round": [r["accuracy"] for r in rows],
            "payload_bytes": payload_bytes(party.get_arrays()),
            "bytes_per_round": round(sum(r["bytes"] for r in trained) / len(trained)) if trained else 0,
            "statistics_bytes": statistics[0] if statistics else 0,
            "shard_sizes": setup.shard_sizes(), "epsilon": None, "bundle": None,
            "rounds_s": round(time.perf_counter() - t0, 2)}


def _final_bundle(party, rounds_log, setup, report: dict[str, Any], seed: int):
    from .outcome import global_specialist

    details = {k: report[k] for k in ("mode", "strategy", "clients", "split", "payload_bytes", "bytes_per_round",
                                      "shard_sizes")}
    return global_specialist(party, rounds_log.arrays, test=setup.test, source=setup.source, seed=seed,
                             train_examples=sum(setup.shard_sizes()), rows=rounds_log.rows, details=details)


def _extras(report, setup, party, initial, alone: bool, personalise: bool, out, seed: int, log) -> None:
    from .outcome import alone_accuracies, personalise_clients

    if alone:
        rows = alone_accuracies(party, initial, setup.shards, test=setup.test, epochs=None, seed=seed, log=log)
        report["alone"] = rows
        report["alone_mean"] = sum(r["accuracy"] for r in rows) / len(rows)
    if personalise:
        folder = Path(f"{Path(out)}-clients")
        report["personalised"] = personalise_clients(Path(report["bundle"]), setup.shards, classes=setup.classes,
                                                     kind=setup.kind, test=setup.test, seed=seed, folder=folder, log=log)


def _run_client(data, address: str, wait_s: float, seed: int, text_column: str, label_column: str, progress: bool,
                t0: float) -> dict[str, Any]:
    from .client import Shard
    from .simulation import join

    shard = Shard(data=str(data), text_column=text_column, label_column=label_column, seed=seed, name=Path(data).stem)
    tally = join(shard, address, max_wait_s=wait_s, progress=progress)
    return {"mode": "client", "client": shard.name, "server_address": address, **tally,
            "wall_s": round(time.perf_counter() - t0, 2)}


def _summary(report: dict[str, Any]) -> str:
    lines = [f"federated {report['strategy']} over {report['clients']} clients: accuracy {report['accuracy']:.4f} "
             f"(round 0: {report['accuracy_per_round'][0]:.4f}); {report['bytes_per_round'] / 1e6:.2f} MB per round "
             f"({report['payload_bytes'] / 1e6:.3f} MB per update)"]
    if report.get("epsilon") is not None:
        lines.append(f"privacy: ({report['epsilon']:.3g}, {report['delta']:g})-DP at clip {report['clip']}, noise {report['noise']}")
    if "alone_mean" in report:
        lines.append(f"clients alone: mean accuracy {report['alone_mean']:.4f}")
    if report.get("bundle"):
        lines.append(f"bundle: {report['bundle']}")
    return "\n".join(lines)
