"""Federated learning of specialists on Flower (docs/FEDERATED.md): clients train adapter + head on their
own shards, a Flower strategy (FedAvg, FedProx, optionally with DP) aggregates, the result is a bundle.

`federate` is the entry point (`headstart federate`); importing this package loads neither torch nor Flower.
"""
from .run import federate

__all__ = ["federate"]
