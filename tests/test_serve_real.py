"""The server for real: uvicorn on a loopback port with a generated token, and real bases (minilm-l6 on trec,
efficientnet-lite0 on hymenoptera photos) answering through the server with the bundles' own labels."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import headstart
from bundle_fixtures import QUIET
from headstart.serve.app import make_app
from serve_fixtures import AUTH, TEXTS, TOKEN, runs  # noqa: F401  (fixtures are found by name)


# ---- a real server -------------------------------------------------------------------------------
def test_real_uvicorn_on_loopback_serves_with_a_generated_token(runs, tmp_path):
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "token"
    code = (f"from headstart.serve import serve; serve([{str(runs / 'topic-probe')!r}], port={port}, "
            f"token_file={str(token_file)!r}, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):  # up to 60 s to start
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.25)
        token = token_file.read_text().strip()
        assert os.stat(token_file).st_mode & 0o777 == 0o600
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
        r = httpx.post(f"{url}/models/topic-probe/predict", headers={"Authorization": f"Bearer {token}"},
                       content=json.dumps({"inputs": TEXTS[0]}), timeout=30)  # curl -d: form-urlencoded
        assert r.status_code == 200 and r.json()[0]["label"] == headstart.load(runs / "topic-probe").predict(TEXTS[:1])[0]
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"auth token written to {token_file}" in out


# ---- real bases, real data ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(data_root, tmp_path_factory) -> Path:
    """A minilm-l6 trec probe and an efficientnet-lite0 hymenoptera probe, fit on small slices."""
    import csv

    root = tmp_path_factory.mktemp("real")
    (root / "trec").mkdir()
    for split, n in (("train", 240), ("test", 40)):
        with open(data_root / "trec" / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))[:n]
        with open(root / "trec" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    for split, n in (("train", 12), ("val", 4)):
        for cls in ("ants", "bees"):
            target = root / "hymenoptera" / split / cls
            target.mkdir(parents=True)
            for photo in sorted((data_root / "hymenoptera" / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(photo, target / photo.name)
    headstart.fit(root / "trec", base="minilm-l6", method="probe", out=root / "trec-probe", **QUIET)
    headstart.fit(root / "hymenoptera", base="efficientnet-lite0", method="probe", out=root / "ants", **QUIET)
    return root


@pytest.mark.real
def test_real_text_and_photo_get_the_bundles_own_labels(real_runs, data_root):
    questions = ["Who wrote Hamlet ?", "How far is the Moon from the Earth ?", "What is the capital of Peru ?",
                 "Why is the sky blue ?"]
    photos = sorted((data_root / "hymenoptera" / "val" / "bees").glob("*.jpg"))[-2:] + \
        sorted((data_root / "hymenoptera" / "val" / "ants").glob("*.jpg"))[-2:]
    trec, ants = headstart.load(real_runs / "trec-probe"), headstart.load(real_runs / "ants")
    with TestClient(make_app([real_runs / "trec-probe", real_runs / "ants"], token=TOKEN)) as c:
        r = c.post("/models/trec-probe/predict", headers=AUTH, json={"inputs": questions, "parameters": {"top_k": 3}})
        assert r.status_code == 200, r.text
        assert [row[0]["label"] for row in r.json()] == trec.predict(questions)
        for photo, want in zip(photos, ants.predict([str(p) for p in photos])):
            r = c.post("/models/ants/predict", headers={**AUTH, "Content-Type": "image/jpeg"},
                       content=photo.read_bytes())
            assert r.status_code == 200 and r.json()[0]["label"] == want, r.text
        facts = {m["id"]: m for m in c.get("/models", headers=AUTH).json()["models"]}
        assert facts["ants"]["task"] == "image-classification" and facts["trec-probe"]["base"]["name"] == "minilm-l6"
