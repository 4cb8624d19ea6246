"""Real federations on the tiny text base: a Flower simulation (3 clients, 2 rounds) and a Flower server
with 2 client processes over loopback. Bounded: every process has a timeout and is killed at the end."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

QUIET = lambda _: None  # noqa: E731


def test_a_simulated_fedprox_federation_with_dp_gives_a_normal_bundle_and_personal_versions(tiny_text_csv, tmp_path):
    import headstart
    from headstart.combine.federated import federate

    out = tmp_path / "global"
    report = federate(tiny_text_csv, clients=3, split="dirichlet:0.5", rounds=2, base="tiny-text", method="lora",
                      strategy="fedprox", proximal_mu=0.1, clip=1.0, noise=0.8, alone=True, personalise=True,
                      out=out, seed=1, log=QUIET, batch_size=8, r=4)
    assert [row["round"] for row in report["rounds"]] == [0, 1, 2]
    assert len(report["shard_sizes"]) == 3 and all(report["shard_sizes"]) and sum(report["shard_sizes"]) == 60
    # Only adapter + head travel: the payload is exactly the LoRA tensors and the head, float32.
    spec = headstart.load(out)
    lora = sum(p.numel() for n, p in spec.model.named_parameters() if "lora_" in n)
    head = sum(p.numel() for p in spec.model.head.parameters())
    base = sum(p.numel() for n, p in spec.model.named_parameters() if "lora_" not in n and not n.startswith("head."))
    assert report["payload_bytes"] == 4 * (lora + head) and 4 * base > report["payload_bytes"]
    for row in report["rounds"][1:]:  # every client got the global tensors and sent its own back
        assert row["clients"] == 3 and row["bytes_up"] == row["bytes_down"] == 3 * report["payload_bytes"]
        assert row["bytes"] == 6 * report["payload_bytes"]
    assert report["bytes_per_round"] == 6 * report["payload_bytes"]
    # The bundle is the last round's global model, a normal classifier bundle.
    assert report["bundle"] == str(out) and report["accuracy"] == pytest.approx(report["rounds"][-1]["accuracy"], abs=1e-6)
    assert spec.evaluate(tiny_text_csv, progress=False)["accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)
    assert spec.manifest["details"]["federated"]["strategy"] == "fedprox"
    assert math.isfinite(report["epsilon"]) and report["epsilon"] > 0 and report["delta"] == 1e-5
    assert [r["client"] for r in report["alone"]] == ["client-0", "client-1", "client-2"]
    assert all(0 <= r["accuracy"] <= 1 for r in report["alone"])
    for row in report["personalised"]:  # global + one local night of `update`: a bundle of its own
        assert Path(row["bundle"]).is_dir() and row["local_test"] > 0
        assert 0 <= row["personal_accuracy"] <= 1
        assert headstart.load(row["bundle"]).predict(["pizza soup bread"])[0] in spec.classes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_tables(tiny_text_csv: Path, folder: Path) -> list[Path]:
    """The tiny training table cut in two, one table per client process."""
    with (tiny_text_csv / "train.csv").open() as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    paths = []
    for i in range(2):
        path = folder / f"client{i}.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *body[i::2]])
        paths.append(path)
    return paths


def _python(code: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def test_a_real_server_and_two_client_processes_federate_over_loopback(tiny_text_csv, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    result = tmp_path / "server.json"
    server_code = (f"import json; from headstart.combine.federated import federate; "
                   f"r = federate({str(tiny_text_csv)!r}, server=True, clients=2, rounds=2, base='tiny-text', "
                   f"server_address={address!r}, round_timeout_s=120, out={str(tmp_path / 'global')!r}, batch_size=8, "
                   f"log=lambda _: None); open({str(result)!r}, 'w').write(json.dumps(r))")
    procs = [_python(server_code, tmp_path / "server.log")]
    try:
        time.sleep(3)  # the clients retry until the server listens; this only saves their first retries
        for i, table in enumerate(_client_tables(tiny_text_csv, tmp_path)):
            code = (f"import json; from headstart.combine.federated import federate; "
                    f"r = federate(client={str(table)!r}, server_address={address!r}, round_timeout_s=120); "
                    f"open({str(tmp_path / f'client{i}.json')!r}, 'w').write(json.dumps(r))")
            procs.append(_python(code, tmp_path / f"client{i}.log"))
        for proc in procs:
            proc.wait(timeout=240)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    logs = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*.log")}
    assert all(proc.returncode == 0 for proc in procs), logs
    report = json.loads(result.read_text())
    # Round 1 pools the clients' class statistics into the starting head; rounds 2 and 3 train.
    assert report["mode"] == "server" and [r["round"] for r in report["rounds"]] == [0, 1, 2, 3]
    assert report["rounds"][1]["stage"] == "head from class statistics" and report["statistics_bytes"] > 0
    assert report["rounds"][1]["accuracy"] > report["rounds"][0]["accuracy"]
    assert all(r["clients"] == 2 and r["bytes"] == 4 * report["payload_bytes"] for r in report["rounds"][2:])
    assert report["bytes_per_round"] == 4 * report["payload_bytes"]
    for i in range(2):
        tally = json.loads((tmp_path / f"client{i}.json").read_text())
        assert tally["mode"] == "client" and tally["rounds"] == 3
        assert tally["bytes_down"] == 3 * report["payload_bytes"]
        assert tally["bytes_up"] == 2 * report["payload_bytes"] + report["statistics_bytes"] // 2 - report["payload_bytes"]
    import headstart

    assert headstart.load(report["bundle"]).predict(["goal match team"])[0] in ("food", "sport", "tech")
