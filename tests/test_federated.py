"""Federated learning's pieces without a federation: the splits, FedProx's hook, the privacy budget,
the wire format and the refusals (tests/test_federated_e2e.py runs real federations)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headstart.core.errors import ConfigError, HeadstartError
from headstart.combine.federated.split import label_histogram, parse_split, split_indices


def _labels(n: int = 600, classes: int = 6, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, classes, n).tolist()


@pytest.mark.parametrize("split", ["iid", "dirichlet:0.1", "dirichlet:0.3", "dirichlet:100"])
def test_every_split_is_a_seeded_partition_with_no_empty_client(split):
    labels = _labels()
    shards = split_indices(labels, 10, split, seed=3)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(labels)))  # every example dealt exactly once
    assert len(shards) == 10 and all(shards)
    assert shards == split_indices(labels, 10, split, seed=3)
    assert shards != split_indices(labels, 10, split, seed=4)


def test_no_client_is_left_empty_even_when_the_draw_leaves_one_without_examples():
    labels = _labels(n=24, classes=2)
    for seed in range(20):  # alpha 0.01 with 12 clients and 24 examples: empty draws happen
        shards = split_indices(labels, 12, "dirichlet:0.01", seed=seed)
        assert all(shards) and sorted(i for s in shards for i in s) == list(range(24))


def _skew(labels, shards, classes=6) -> float:
    """Mean share of a client's examples held by its most common class (1/classes = balanced)."""
    hist = np.array(label_histogram(labels, shards, classes), dtype=float)
    return float((hist.max(1) / hist.sum(1)).mean())


def test_smaller_dirichlet_alpha_means_more_label_skew():
    labels = _labels(n=3000)
    iid = _skew(labels, split_indices(labels, 10, "iid", 0))
    mild = _skew(labels, split_indices(labels, 10, "dirichlet:10", 0))
    harsh = _skew(labels, split_indices(labels, 10, "dirichlet:0.1", 0))
    assert iid < 0.25 and mild < 0.35  # near the balanced 1/6
    assert harsh > 0.6 > mild


def test_iid_shards_are_near_equal():
    sizes = [len(s) for s in split_indices(_labels(n=1003), 10, "iid", 1)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x", "noniid", "iid:2"])
def test_bad_split_names_are_refused_in_one_line(bad):
    with pytest.raises(ConfigError, match="split|dirichlet"):
        parse_split(bad)


def test_more_clients_than_examples_is_refused():
    with pytest.raises(ConfigError, match="cannot give 5 clients"):
        split_indices([0, 1, 0], 5, "iid")


def test_the_proximal_hook_pulls_towards_the_round_start_and_is_zero_there():
    from headstart.combine.federated.model import ProximalTerm
    from headstart.engine.trainer import RunState

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # frozen tensors are not pulled
    hook = ProximalTerm(model, mu=0.5)
    run = RunState(model=model)
    assert hook.extra_loss(run, [0]).item() == 0.0
    with torch.no_grad():
        model[1].weight += 0.1
        model[0].weight += 5.0
    expected = 0.5 * 0.5 * (0.1 ** 2) * model[1].weight.numel()
    loss = hook.extra_loss(run, [0])
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()  # the gradient is mu * (w - w_global)
    assert torch.allclose(model[1].weight.grad, torch.full_like(model[1].weight, 0.5 * 0.1), atol=1e-6)


def test_fedprox_hook_keeps_a_client_closer_to_the_global_model():
    """The same local training with and without the proximal term: with it, the weights move less."""
    from headstart.combine.federated.model import ProximalTerm
    from headstart.engine.batches import EpochShuffle
    from headstart.engine.schedule import warmup_cosine_schedule
    from headstart.engine.trainer import TrainSettings, train

    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        start = model.weight.detach().clone()
        hooks = [ProximalTerm(model, mu)] if mu else []
        step = lambda idx, p: (torch.nn.functional.cross_entropy(model(x[idx]), y[idx]), {}, len(idx))  # noqa: E731
        train(model, plan=EpochShuffle(64, 8, 5, 0), step_loss=step, param_groups=[{"params": list(model.parameters()), "lr": 0.1}],
              settings=TrainSettings(lr_schedule=warmup_cosine_schedule(0.0)), hooks=hooks, progress=False)
        return float((model.weight.detach() - start).norm())

    assert drift(10.0) < 0.5 * drift(0.0)


def test_epsilon_is_finite_and_falls_as_the_noise_rises():
    from headstart.combine.federated.strategy import epsilon

    values = [epsilon(noise, sample_rate=0.3, rounds=20, delta=1e-5) for noise in (0.5, 1.0, 2.0, 4.0)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    assert epsilon(1.0, 0.3, 40, 1e-5) > epsilon(1.0, 0.3, 20, 1e-5)  # more rounds spend more
    assert epsilon(0.0, 0.3, 20, 1e-5) == math.inf


def test_epsilon_matches_opacus_directly():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    from headstart.combine.federated.strategy import epsilon

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.5, noise_multiplier=1.2, steps=10, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert epsilon(1.2, 0.5, 10, 1e-5) == pytest.approx(float(eps), rel=1e-9)


def test_bytes_per_round_are_the_tensors_sent_and_received():
    from headstart.combine.federated.strategy import sum_fit_metrics

    per = {"bytes_up": 100, "bytes_down": 100, "train_loss": 1.0}
    out = sum_fit_metrics([(10, per), (30, {**per, "train_loss": 3.0})])
    assert out["bytes_up"] == 200 and out["bytes_down"] == 200 and out["clients"] == 2
    assert out["train_loss"] == pytest.approx(2.5)


@pytest.mark.parametrize("address", ["0.0.0.0:9092", "10.0.0.2:9092", "example.com:80", "127.0.0.1", "127.0.0.1:x"])
def test_only_loopback_addresses_are_accepted(address):
    from headstart.combine.federated.simulation import check_loopback

    with pytest.raises(ConfigError, match="loopback"):
        check_loopback(address)
    assert check_loopback("127.0.0.1:9092") == "127.0.0.1:9092"


@pytest.mark.parametrize("kwargs, needle", [
    ({"server": True, "client": "x.csv"}, "one role"),
    ({"rounds": 0}, "rounds >= 1"),
    ({"fraction": 0.0}, "fraction"),
    ({"personalise": True}, "out="),
    ({"noise": 1.0}, "clip"),
    ({"server": True, "server_address": "0.0.0.0:9092"}, "loopback"),
    ({"split": "by-file"}, "two or more"),
    ({"split": "zipf"}, "unknown split"),
    ({"data": []}, "no data"),
])
def test_federate_refuses_bad_settings_in_one_line(tiny_text_csv, kwargs, needle):
    from headstart.combine.federated import federate

    with pytest.raises(HeadstartError, match=needle):
        federate(kwargs.pop("data", tiny_text_csv), clients=3, base="tiny-text", log=lambda _: None, **kwargs)


def test_importing_federated_loads_neither_torch_nor_flower():
    import subprocess
    import sys

    code = ("import sys, headstart.combine.federated as f; f.federate; "
            "print('torch' in sys.modules, 'flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr[-500:]


def test_the_wire_arrays_are_copies_of_adapter_and_head_that_load_back():
    from headstart.combine.federated.model import Party

    party = Party("tiny-text", "lora", ["a", "b", "c"], {"r": 2}, seed=0)
    assert party.keys and all("lora_" in k or k.startswith("head.") for k in party.keys)
    arrays = party.get_arrays()
    before = [a.copy() for a in arrays]
    with torch.no_grad():
        for p in party.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before))  # training does not reach the sent arrays
    party.set_arrays(arrays)
    assert all(np.array_equal(a, b) for a, b in zip(party.get_arrays(), before))
    with pytest.raises(ConfigError, match="same base, method and options"):
        party.set_arrays(arrays[:-1])
    with pytest.raises(ConfigError, match="shape"):
        party.set_arrays([np.zeros((1, 1), np.float32)] * len(arrays))


def test_by_file_gives_one_client_per_table_with_the_union_of_labels_and_tests(tmp_path):
    from conftest import text_rows, write_table

    from headstart.combine.federated.shards import Setup

    folders = []
    for name, classes in (("books", ("food", "sport")), ("dvd", ("sport", "tech"))):
        folder = tmp_path / name
        write_table(folder / "train.csv", text_rows(20, seed=0, classes=classes))
        write_table(folder / "test.csv", text_rows(10, seed=1, classes=classes))
        folders.append(folder)
    setup = Setup.build(folders, clients=10, split="by-file", seed=0, text_column="text", label_column="label",
                        server=False)
    assert setup.clients == 2 and [s.name for s in setup.shards] == ["books", "dvd"]
    assert setup.classes == ["food", "sport", "tech"] and len(setup.test) == 20
    assert setup.shard_sizes() == [20, 20]
    assert {setup.classes[y] for y in setup.test.labels} == {"food", "sport", "tech"}
    dvd_train, _, own = setup.shards[1].load()
    assert own == ["sport", "tech"] and len(dvd_train) == 20
    with pytest.raises(ConfigError, match="by-file"):
        Setup.build(folders, clients=2, split="iid", seed=0, text_column="text", label_column="label", server=False)


def test_a_client_round_trains_its_shard_and_fedprox_mu_keeps_it_near_the_global_tensors(tiny_text_csv):
    import json

    from headstart.combine.federated.client import Shard, ShardClient, party_for
    from headstart.combine.federated.model import payload_bytes
    from headstart.combine.federated.strategy import Plan, build_strategy, RoundLog

    recipe = json.dumps({"base": "tiny-text", "method": "lora", "options": {"r": 2, "batch_size": 8, "lr": 5e-2,
                                                                            "head_lr": 5e-2},
                         "classes": ["food", "sport", "tech"], "seed": 0}, sort_keys=True)
    start = party_for(recipe).get_arrays()
    client = ShardClient(Shard(data=str(tiny_text_csv), indices=list(range(30)), name="c0"), log=lambda _: None)

    def drift(mu: float) -> float:
        config = {"recipe": recipe, "local_epochs": 3, "seed": 0, "round": 1, "rounds": 2, "proximal_mu": mu}
        arrays, count, metrics = client.fit([a.copy() for a in start], config)
        assert count == 30 and metrics["bytes_up"] == metrics["bytes_down"] == payload_bytes(start)
        return float(sum(((a - b) ** 2).sum() for a, b in zip(arrays, start)) ** 0.5)

    free, pulled = drift(0.0), drift(50.0)
    assert free > 0 and pulled < 0.5 * free
    # Flower's FedProx is what sends mu to the clients, inside every round's config.
    plan = Plan(recipe=json.loads(recipe), clients=2, rounds=1, strategy="fedprox", proximal_mu=0.7)
    strategy = build_strategy(plan, start, lambda arrays: 0.0, RoundLog())
    assert type(strategy).__name__ == "FedProx" and strategy.proximal_mu == 0.7
    dp = build_strategy(Plan(recipe=plan.recipe, clients=2, rounds=1, clip=1.0, noise=1.0), start, lambda a: 0.0,
                        RoundLog())
    assert type(dp).__name__ == "DifferentialPrivacyServerSideFixedClipping" and type(dp.strategy).__name__ == "FedAvg"


def test_pooled_class_statistics_are_the_union_s_and_their_discriminant_head_separates_the_classes(tiny_text_csv):
    from headstart.combine.federated.client import Shard
    from headstart.combine.federated.model import Party, remap_labels
    from headstart.combine.federated.warmup import arrays_with_head, class_statistics, lda_head

    classes = ["food", "sport", "tech"]
    party = Party("tiny-text", "lora", classes, {"r": 2}, seed=0)
    shards = [Shard(data=str(tiny_text_csv), indices=list(range(i, 30, 3)), name=f"c{i}") for i in range(3)]
    splits = [remap_labels(train, own, classes) for train, _, own in (s.load() for s in shards)]
    union_train, _, own = Shard(data=str(tiny_text_csv), indices=list(range(30))).load()
    # Flower's FedAvg: the example-weighted mean of what each client sends = the union's moments.
    sent = [class_statistics(party, split) for split in splits]
    pooled = [sum(len(split) * s[k] for split, s in zip(splits, sent)) / 30 for k in range(3)]
    for mine, theirs in zip(pooled, class_statistics(party, remap_labels(union_train, own, classes))):
        assert np.allclose(mine, theirs, atol=1e-5)
    assert np.isclose(pooled[1].sum(), 1.0)
    # Three well-separated Gaussian classes in 8 dimensions (a fourth class nobody holds): the head
    # from their moments classifies new draws of them and never predicts the absent class.
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.eye(4, 8)
    x = torch.cat([centres[c] + torch.randn(200, 8, generator=gen) for c in range(3)]).double()
    y = torch.arange(3).repeat_interleave(200)
    sums = torch.zeros(4, 8, dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=4).double()
    weight, bias = lda_head([(t / 600).numpy() for t in (sums, counts, x.T @ x)])
    fresh = torch.cat([centres[c] + torch.randn(100, 8, generator=gen) for c in range(3)])
    predicted = (fresh @ weight.T + bias).argmax(1)
    assert (predicted == torch.arange(3).repeat_interleave(100)).float().mean() > 0.95
    assert torch.all(weight[3] == 0) and bias[3] < bias[:3].min()
    arrays = party.get_arrays()
    swapped = arrays_with_head(party.keys, arrays, torch.ones(3, arrays[party.keys.index("head.weight")].shape[1]),
                               torch.zeros(3))
    assert np.all(swapped[party.keys.index("head.weight")] == 1) and np.all(arrays[party.keys.index("head.weight")] != 1)
    assert all(np.array_equal(a, b) for k, a, b in zip(party.keys, arrays, swapped) if not k.startswith("head."))


def test_the_statistics_round_comes_first_and_only_without_dp():
    from headstart.combine.federated.strategy import Plan, RoundLog, build_strategy

    recipe = {"base": "tiny-text", "method": "lora", "options": {}, "classes": ["a", "b"], "seed": 0}
    plan = Plan(recipe=recipe, clients=2, rounds=3, head_from_statistics=True)
    assert plan.total_rounds == 4 and [plan.stage(r) for r in (1, 2, 4)] == ["statistics", "train", "train"]
    made = build_strategy(plan, [np.zeros(2, np.float32)], lambda a: 0.0, RoundLog(), head_from=lambda s: s)
    assert type(made).__name__ == "HeadFirstFedAvg"
    config = made.on_fit_config_fn(2)
    assert config["stage"] == "train" and config["round"] == 1 and config["rounds"] == 3  # lr decay: training rounds
    with pytest.raises(ConfigError, match="no DP"):
        build_strategy(Plan(recipe=recipe, clients=2, rounds=1, head_from_statistics=True, clip=1.0),
                       [np.zeros(2, np.float32)], lambda a: 0.0, RoundLog(), head_from=lambda s: s)
    lines = []
    log = RoundLog(plan=plan, say=lines.append)
    log.fit_done({"bytes_up": 10, "bytes_down": 20, "train_loss": 0.0, "clients": 2})
    log.evaluated(1, [], 0.5)
    assert log.rows[0]["stage"] == "head from class statistics" and "train_loss" not in log.rows[0]
    assert "round 1/4 (head from the class statistics): accuracy 0.5000" in lines[0]
