"""Tiny bundles of every kind, shared by the bundle test modules (imported there: pytest finds them by name)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

import headstart

QUIET = {"progress": False, "log": lambda s: None}
LLM_FAST = {"epochs": 1, "batch_size": 4, "lr": 5e-3, "max_length": 64, "side_by_side": 0, "max_new_tokens": 4,
            "bf16": "false"}
INPUTS = ["goal team match", "pizza soup bread", "laptop code chip", "my very apple today"]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


@pytest.fixture(scope="module")
def probe_bundle(tiny_text_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "spec"
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", out=out, **QUIET)
    return out


@pytest.fixture(scope="module")
def lora_bundle(tiny_text_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "spec"
    headstart.fit(tiny_text_csv, base="tiny-text", method="lora", epochs=1, out=out, **QUIET)
    return out


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft-data")
    rows = [{"instruction": f"What is the colour of {x}?", "output": c}
            for x, c in [("snow", "white"), ("grass", "green"), ("coal", "black"), ("the sky", "blue")] * 3]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return {"train": root / "train.jsonl", "test": root / "test.jsonl", "root": root}


@pytest.fixture(scope="module")
def sft_bundle(sft_files) -> Path:
    out = sft_files["root"] / "sft"
    headstart.fit(sft_files["train"], base="tiny-llm", method="lora", task="sft", eval=sft_files["test"], out=out,
                  **QUIET, **LLM_FAST)
    return out


@pytest.fixture(scope="module")
def dpo_bundle(sft_bundle) -> Path:
    """A dpo-kind bundle: the sft bundle's adapter under a dpo manifest (what a DPO run writes)."""
    out = sft_bundle.parent / "dpo"
    shutil.copytree(sft_bundle, out)
    edit_manifest(out, lambda m: m.update(task="dpo", parent={"bundle": str(sft_bundle), "task": "sft"},
                                          metrics={"reward_accuracy": 0.75, "eval_dpo_loss": 0.6}))
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(bundle: Path) -> Path:
        dst = tmp_path / "copies" / bundle.name
        shutil.copytree(bundle, dst)
        return dst
    return make


def as_v1(folder: Path) -> None:
    """Rewrite a bundle's manifest the way headstart wrote it before manifest v2."""
    def downgrade(m):
        for key in ("kind", "heads", "adapters"):
            m.pop(key, None)
        m["format_version"] = 1
        if m.get("task") in ("sft", "dpo"):
            m["files"] = {"trained": "trained.safetensors"}  # v1 LM bundles carried an empty one
    edit_manifest(folder, downgrade)
    if json.loads((folder / "manifest.json").read_text()).get("task") in ("sft", "dpo"):
        save_file({}, folder / "trained.safetensors")
