"""The training engine: schedules, layer-wise LRs, determinism, resume (Ctrl-C and kill -9), feature cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import headstart
from conftest import kill_after_first_checkpoint
from headstart.data import load_image
from headstart.engine.features import cached_features, encode
from headstart.engine.schedule import layerwise_param_groups, warmup_cosine
from headstart.methods.registry import get_method_spec

# ---- schedules (pure functions on toy modules) ----------------------------------------------


def lr_trace(total: int, warmup: int, lr: float = 0.5) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = warmup_cosine(opt, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_cosine_shape():
    lr = 0.5
    lrs = lr_trace(100, 10, lr)
    assert 0 < lrs[0] <= 0.1 * lr, "warm-up starts small"
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warm-up rises linearly"
    assert max(range(100), key=lrs.__getitem__) == 10, "peak at the end of warm-up"
    assert lrs[10] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine decays monotonically"
    assert lrs[55] == pytest.approx(lr * 0.5, rel=0.05), "half-way through the cosine: half the rate"
    assert 0 <= lrs[-1] < 0.01 * lr, "ends near 0"


def test_warmup_cosine_without_warmup_starts_at_peak():
    lrs = lr_trace(20, 0, 1.0)
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] < 0.05


class Block(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 4), nn.LayerNorm(4))


def test_layerwise_param_groups_decay_from_the_top():
    blocks = [(f"b{i}", Block()) for i in range(3)]
    head = nn.Linear(4, 2)
    lr, head_lr, decay, wd = 1e-3, 1e-2, 0.5, 0.1
    groups = layerwise_param_groups(blocks, head, lr, head_lr, decay, wd)
    assert all(g["params"] for g in groups)
    owner = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in owner, "a parameter in two groups"
            owner[id(p)] = g
    all_params = [p for _, b in blocks for p in b.parameters()] + list(head.parameters())
    assert set(owner) == {id(p) for p in all_params}

    for depth_from_top, (_, block) in enumerate(reversed(blocks)):
        expected = lr * decay ** depth_from_top
        for p in block.parameters():
            assert owner[id(p)]["lr"] == pytest.approx(expected)
        linear, norm = block[0], block[1]
        assert owner[id(linear.weight)]["weight_decay"] == wd
        for p in (linear.bias, norm.weight, norm.bias):  # biases and norms: no weight decay
            assert owner[id(p)]["weight_decay"] == 0.0
    assert owner[id(blocks[-1][1][0].weight)]["lr"] == lr, "the top block gets the full rate"
    assert owner[id(head.weight)]["lr"] == head_lr and owner[id(head.weight)]["weight_decay"] == wd
    assert owner[id(head.bias)]["lr"] == head_lr and owner[id(head.bias)]["weight_decay"] == 0.0


# ---- determinism ----------------------------------------------------------------------------

DATA_FOR = {"tiny-image": "tiny_image_folder", "tiny-text": "tiny_text_csv"}


@pytest.mark.parametrize("base", list(DATA_FOR))
def test_same_seed_gives_bit_identical_weights(request, tmp_path, base):
    data = request.getfixturevalue(DATA_FOR[base])
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        headstart.fit(data, base=base, method="finetune", epochs=2, seed=seed, progress=False, out=out)
        outs.append(out)
    a, b, c = (load_file(o / "trained.safetensors") for o in outs)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between two runs with the same seed"
    assert (outs[0] / "trained.safetensors").read_bytes() == (outs[1] / "trained.safetensors").read_bytes()
    assert any(not torch.equal(a[k], c[k]) for k in a), "the seed has no effect"


# ---- resume after Ctrl-C --------------------------------------------------------------------

RESUME_CASES = [("finetune", "tiny-image"), ("finetune", "tiny-text"), ("lora", "tiny-text")]


@pytest.mark.parametrize("method,base", RESUME_CASES)
def test_resume_after_interrupt_matches_uninterrupted_run(request, tmp_path, monkeypatch, method, base):
    data = request.getfixturevalue(DATA_FOR[base])
    opts = dict(base=base, method=method, epochs=4, patience=0, seed=0, progress=False, early_stopping="holdout")
    ref = headstart.fit(data, out=tmp_path / "ref", **opts)

    method_cls = get_method_spec(method).method_cls
    original = method_cls.set_mode

    def interrupt_at_epoch_3(self, model, epoch):
        if epoch == 2:  # 0-based: epochs 1 and 2 are done and checkpointed
            raise KeyboardInterrupt
        return original(self, model, epoch)

    monkeypatch.setattr(method_cls, "set_mode", interrupt_at_epoch_3)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        headstart.fit(data, out=out, **opts)
    monkeypatch.undo()
    ckpt = tmp_path / ".run.checkpoint"
    assert (ckpt / "state.json").is_file(), "no checkpoint next to the bundle folder"
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    assert not out.exists()

    logs: list[str] = []
    resumed = headstart.fit(data, out=out, resume=True, log=logs.append, **opts)
    assert any("resumed" in line and "2/4" in line for line in logs), logs
    assert [h["epoch"] for h in resumed.manifest["history"]] == [1, 2, 3, 4]
    # Epoch by epoch the same run: the final weights alone could hide a divergence after the
    # resume, since the best epoch's weights are restored at the end.
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [h[key] for h in resumed.manifest["history"]] == [h[key] for h in ref.manifest["history"]], key
    assert not ckpt.exists(), "the checkpoint should be removed once the bundle is written"

    want, got = ref.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs from the uninterrupted run"
    a, b = load_file(tmp_path / "ref" / "trained.safetensors"), load_file(out / "trained.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_starts_fresh(tiny_text_csv, tmp_path):
    logs: list[str] = []
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="finetune", epochs=1, progress=False,
                         out=tmp_path / "b", resume=True, log=logs.append)
    assert not any("resumed" in line for line in logs)
    assert len(spec.manifest["history"]) == 1


# ---- resume after kill -9 -------------------------------------------------------------------

FIT_SCRIPT = """
import sys, headstart
headstart.fit(sys.argv[1], base="tiny-text", method="finetune", epochs=int(sys.argv[3]), batch_size=4, patience=0,
              seed=0, progress=False, out=sys.argv[2], resume=sys.argv[4] == "1", log=lambda s: print(s, flush=True))
"""


@pytest.mark.slow
def test_resume_after_kill_9(tiny_text_csv, tmp_path):
    out, epochs = tmp_path / "killed", 40
    cmd = [sys.executable, "-c", FIT_SCRIPT, str(tiny_text_csv), str(out), str(epochs)]
    kill_after_first_checkpoint(cmd + ["0"], tmp_path / ".killed.checkpoint", timeout=120)
    assert not out.exists(), "the run finished before the kill: make it longer"

    done = subprocess.run(cmd + ["1"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [line for line in done.stdout.splitlines() if line.startswith("resumed from")]
    assert resumed, done.stdout[-2000:]
    after = int(resumed[0].split("after epoch ")[1].split("/")[0])
    assert 1 <= after < epochs
    manifest = json.loads((out / "manifest.json").read_text())
    assert [h["epoch"] for h in manifest["history"]] == list(range(1, epochs + 1))
    assert headstart.load(out).predict(["goal team"])[0] in manifest["classes"]
    assert not (tmp_path / ".killed.checkpoint").exists()


# ---- feature cache --------------------------------------------------------------------------

def test_feature_cache_extracts_only_what_is_new(image_folder_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    base = headstart.load_base("tiny-image")
    items = sorted(str(p) for p in (image_folder_copy / "train").rglob("*.png"))
    assert len(items) == 24

    first, n = cached_features(base, items, load_image, progress=False)
    assert n == len(items) and first.shape == (24, base.feature_dim)
    torch.testing.assert_close(first, encode(base, items, load_image, progress=False), atol=1e-5, rtol=1e-5)

    second, n = cached_features(base, items, load_image, progress=False)
    assert n == 0
    assert torch.equal(second, first)

    changed = Path(items[7])
    noise = np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(changed)  # same path, new bytes
    third, n = cached_features(base, items, load_image, progress=False)
    assert n == 1
    keep = [i for i in range(24) if i != 7]
    assert torch.equal(third[keep], first[keep]) and not torch.equal(third[7], first[7])

    subset, n = cached_features(base, items[::3], load_image, progress=False)
    assert n == 0 and torch.equal(subset, third[::3])

    renamed = changed.with_name("renamed.png")
    changed.rename(renamed)  # the key is the content, not the name
    _, n = cached_features(base, [str(renamed)], load_image, progress=False)
    assert n == 0

    _, n = cached_features(base, items[:3], load_image, progress=False, use_cache=False)
    assert n == 3


def test_feature_cache_for_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    base = headstart.load_base("tiny-text")
    texts = ["one", "two words", "three more words", "two words"]  # a duplicate is extracted once
    feats, n = cached_features(base, texts, lambda x: x, progress=False)
    assert n == 4 and torch.equal(feats[1], feats[3])
    again, n = cached_features(base, texts + ["new"], lambda x: x, progress=False)
    assert n == 1 and torch.equal(again[:4], feats)
    assert os.listdir(tmp_path / "cache" / "features")


def test_a_damaged_feature_shard_is_removed_and_its_rows_extracted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    base = headstart.load_base("tiny-text")
    texts = ["alpha", "beta gamma"]
    feats, _ = cached_features(base, texts, lambda x: x, progress=False)
    shards = list((tmp_path / "cache" / "features").rglob("shard-*.safetensors"))
    assert len(shards) == 1
    shards[0].write_bytes(b"\x00" * 40)  # damaged on disk (bit rot, a full disk, a foreign tool)
    again, n = cached_features(base, texts, lambda x: x, progress=False)
    assert n == 2 and torch.equal(again, feats), "the damaged shard's rows are extracted again"
    assert not shards[0].exists(), "the damaged shard is removed, not skipped on every read"
