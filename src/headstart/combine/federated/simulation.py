"""Where the rounds run: a Flower simulation on this machine (`flwr.simulation.run_simulation`, Ray
workers play the clients), or a real Flower server and client processes over gRPC.

Flower 1.42 keeps `flwr.server.start_server` and `flwr.client.start_client` (the gRPC-bidi transport)
as deprecated shims beside its SuperLink/SuperNode deployment; they are the supported way to run a
server and clients as plain Python processes without packaging a Flower App, so `serve` and `join`
use them (see docs/FEDERATED.md). Every address is loopback: the channel is insecure gRPC (no TLS).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from ...core.errors import ConfigError
from .client import Shard, ShardClient
from .model import Party
from .strategy import Plan, RoundLog, build_strategy
from .warmup import head_maker

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def check_loopback(address: str) -> str:
    """`host:port` on this machine only: the gRPC channel has no TLS, so it must not leave the host."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or host not in LOOPBACK:
        raise ConfigError(f"server_address {address!r}: use 127.0.0.1:PORT (loopback only: the channel is not encrypted)")
    return address


def quiet_flower(progress: bool) -> None:
    """Flower logs every round at INFO; keep it when the user asked for progress."""
    logging.getLogger("flwr").setLevel(logging.INFO if progress else logging.WARNING)


def evaluator(party: Party, test) -> Callable[[list], float]:
    def evaluate(arrays: list) -> float:
        party.set_arrays(arrays)
        return party.accuracy(test)

    return evaluate


def simulate(plan: Plan, shards: list[Shard], party: Party, test, *, workers: int = 1, progress: bool = False,
             say: Callable[[str], None] = lambda line: None) -> RoundLog:
    """All rounds as a Flower simulation: the server (strategy + evaluation) in this process, the clients
    in `workers` Ray worker processes, each playing client after client."""
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    quiet_flower(progress)
    log = RoundLog(plan=plan, say=say)
    evaluate = evaluator(party, test)  # round 0 (the untrained global model) is measured too
    initial = party.get_arrays()

    def server_fn(context) -> ServerAppComponents:
        strategy = build_strategy(plan, initial, evaluate, log, head_maker(party, initial))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=plan.total_rounds))

    plain = [Shard(**vars(s)) for s in shards]  # plain data: all a worker receives

    def client_fn(context):
        return ShardClient(plain[int(context.node_config["partition-id"])], log=lambda _: None).to_client()

    use_gpu = _cuda()
    # Ray sets each actor's OMP_NUM_THREADS to the CPUs it is given: one worker on a 2-core laptop
    # would otherwise train on one thread while the other core idles.
    per_worker = max(1, (os.cpu_count() or 1) // workers)
    backend = {"client_resources": {"num_cpus": per_worker, "num_gpus": (1.0 / workers) if use_gpu else 0.0},
               "init_args": {"num_cpus": per_worker * workers, "num_gpus": 1 if use_gpu else 0, "include_dashboard": False,
                             "log_to_driver": progress, "logging_level": logging.ERROR}}
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences Ray's notice; no GPU is hidden
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(shards), backend_config=backend, verbose_logging=False)
    if log.arrays is None or len(log.rows) < plan.total_rounds + 1:
        raise ConfigError(f"the simulation ended after {max(0, len(log.rows) - 1)} of {plan.total_rounds} rounds "
                          "(a client failed: run with progress=True to see the workers' logs)")
    return log


def serve(plan: Plan, party: Party, test, address: str, *, round_timeout_s: float, progress: bool = False,
          say: Callable[[str], None] = lambda line: None) -> RoundLog:
    """Serve `plan.rounds` rounds on `address`, waiting for `plan.clients` client processes."""
    from flwr.server import ServerConfig, SimpleClientManager, start_server

    class PatientClientManager(SimpleClientManager):
        """Flower waits a day for the clients a round needs: here, `round_timeout_s` (a missing client
        process ends the federation with an error instead of a hang)."""

        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            return super().wait_for(num_clients, timeout=int(min(timeout, round_timeout_s)))

    quiet_flower(progress)
    log = RoundLog(plan=plan, say=say)
    initial = party.get_arrays()
    strategy = build_strategy(plan, initial, evaluator(party, test), log, head_maker(party, initial))
    start_server(server_address=check_loopback(address), strategy=strategy, client_manager=PatientClientManager(),
                 config=ServerConfig(num_rounds=plan.total_rounds, round_timeout=round_timeout_s))
    if sum(1 for row in log.rows if row.get("clients")) < plan.total_rounds:
        raise ConfigError(f"the server ended after {max(0, len(log.rows) - 1)} of {plan.total_rounds} rounds "
                          f"(fewer than {plan.clients} clients answered within {round_timeout_s:.0f} s)")
    return log


class CountingClient(ShardClient):
    """A client process's own tally: rounds trained and bytes received and sent."""

    def __init__(self, shard: Shard, log=print):
        super().__init__(shard, log)
        self.tally: dict[str, Any] = {"rounds": 0, "bytes_up": 0, "bytes_down": 0, "examples": 0}

    def fit(self, parameters, config):
        arrays, count, metrics = super().fit(parameters, config)
        for key in ("bytes_up", "bytes_down"):
            self.tally[key] += metrics[key]
        self.tally["rounds"] += 1
        self.tally["examples"] = count
        return arrays, count, metrics


def join(shard: Shard, address: str, *, max_wait_s: float, progress: bool = False) -> dict[str, Any]:
    """Be one client of a server on `address` until it ends the federation; returns this client's tally."""
    from flwr.client import start_client

    quiet_flower(progress)
    client = CountingClient(shard, log=print if progress else (lambda _: None))
    _wait_for_server(address, max_wait_s)
    start_client(server_address=check_loopback(address), client=client.to_client(), insecure=True,
                 max_wait_time=max_wait_s)
    return client.tally


def _wait_for_server(address: str, max_wait_s: float) -> None:
    """Flower's gRPC-bidi client gives up at once when nothing listens yet: wait for the port first."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(f"no Flower server answered on {address} within {max_wait_s:.0f} s") from None
            time.sleep(0.5)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
