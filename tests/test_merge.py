"""Bundle-level merges (combine/merge.py): soups, TIES & co. over tiny LoRA / finetune specialists, a head per
task for different label sets, the stored adapter equal to the merge's maths, clear refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import headstart
from headstart.combine.lora_delta import lora_deltas, read_lora
from headstart.core.errors import HeadstartError

from bundle_fixtures import QUIET, one_line

MUTE = {"log": lambda s: None}
from conftest import assert_clean_error, headstart_cli, sampled_copy, text_rows, write_table


def _task(root: Path, classes, seed: int) -> Path:
    write_table(root / "train.csv", text_rows(48, seed=seed, classes=classes))
    write_table(root / "val.csv", text_rows(24, seed=seed + 100, classes=classes))
    write_table(root / "test.csv", text_rows(24, seed=seed + 200, classes=classes))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    three = _task(root / "three", ("food", "sport", "tech"), 0)
    two = _task(root / "two", ("tech", "food"), 1)
    out = {}
    for seed in range(3):
        out[f"s{seed}"] = root / f"three-s{seed}"
        headstart.fit(three, base="tiny-text", method="lora", epochs=2, r=2, seed=seed, out=out[f"s{seed}"], **QUIET)
    out["two"] = root / "two-lora"
    headstart.fit(two, base="tiny-text", method="lora", epochs=2, r=2, seed=5, out=out["two"], **QUIET)
    out["ft0"], out["ft1"] = root / "ft0", root / "ft1"
    for seed, key in enumerate(("ft0", "ft1")):
        headstart.fit(three, base="tiny-text", method="finetune", epochs=1, seed=seed, out=out[key], **QUIET)
    out["probe"] = root / "probe"
    headstart.fit(three, base="tiny-text", method="probe", out=out["probe"], **QUIET)
    out["data_three"], out["data_two"] = three, two
    return out


def _deltas(bundle: Path) -> dict[str, torch.Tensor]:
    return lora_deltas(read_lora(bundle / "adapter"))


def test_uniform_soup_stores_the_mean_of_the_exact_deltas(runs, tmp_path):
    bundles = [runs["s0"], runs["s1"], runs["s2"]]
    report = headstart.merge(bundles, method="soup", out=tmp_path / "soup", **MUTE)
    merged, parts = _deltas(tmp_path / "soup"), [_deltas(b) for b in bundles]
    assert set(merged) == set(parts[0])
    for name, delta in merged.items():
        expected = sum(p[name] for p in parts) / 3  # B·A averaged, never A's and B's separately
        assert torch.allclose(delta, expected, atol=1e-5), name
    assert report["energy"]["min"] > 0.9999  # exact rank by default
    assert len(report["ingredients"]) == 3 and all("eval" in r for r in report["ingredients"])
    assert {"best_ingredient", "mean_ingredient", "accuracy"} <= set(report)
    spec = headstart.load(tmp_path / "soup")
    assert spec.predict(["goal team match"])[0] in ("food", "sport", "tech")
    manifest = json.loads((tmp_path / "soup" / "manifest.json").read_text())
    assert manifest["details"]["merge"]["recipe"]["method"] == "linear"
    assert manifest["metrics"]["accuracy"] == pytest.approx(spec.evaluate(runs["data_three"], progress=False)["accuracy"], abs=1e-4)


def test_a_soup_of_one_specialist_twice_is_that_specialist(runs, tmp_path):
    report = headstart.merge([runs["s0"], runs["s0"]], method="soup", out=tmp_path / "same", **MUTE)
    for name, delta in _deltas(tmp_path / "same").items():
        assert torch.allclose(delta, _deltas(runs["s0"])[name], atol=1e-5)
    assert report["accuracy"] == pytest.approx(report["ingredients"][0]["eval"]["accuracy"], abs=1e-4)


def test_greedy_soup_starts_from_the_best_and_reports_each_step(runs):
    report = headstart.merge([runs["s0"], runs["s1"], runs["s2"]], method="soup", greedy_on="val", **MUTE)
    steps = report["greedy"]
    assert len(steps) == 3 and steps[0]["added"]
    best = max(report["ingredients"], key=lambda r: r["select"])
    assert steps[0]["run"] == best["bundle"]
    kept = [s for s in steps if s["added"]]
    assert len([w for w in report["recipe"]["weights"] if w]) == len(kept)


def test_different_label_sets_get_a_head_per_task(runs, tmp_path):
    out = tmp_path / "both"
    report = headstart.merge([runs["s0"], runs["two"]], method="ties", density=0.5, out=out, **MUTE)
    assert set(report["tasks"]) == {"three-s0", "two-lora"}
    for t in report["tasks"].values():
        assert {"kept", "refit", "head", "alone", "normalized"} <= set(t)
    with pytest.raises(HeadstartError) as e:
        headstart.load(out)
    assert "three-s0" in one_line(e) and "two-lora" in one_line(e)
    two = headstart.load(out, head="two-lora")
    assert set(two.classes) == {"tech", "food"}
    assert set(two.predict(["laptop code chip", "pizza soup bread"])) <= {"tech", "food"}
    r = headstart_cli("predict", str(out), "laptop code chip", "--task", "two-lora", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["predictions"][0]["label"] in ("tech", "food")
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["heads"]) == {"three-s0", "two-lora"} and set(m["metrics"]["tasks"]) == set(m["heads"])


def test_auto_tries_the_grid_on_the_selection_split(runs):
    report = headstart.merge([runs["s0"], runs["two"]], method="auto", **MUTE)
    methods = {c["method"] for c in report["candidates"]}
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"} <= methods
    best = max(report["candidates"], key=lambda c: c["select_accuracy"])
    assert report["recipe"]["label"] == best["label"]


def test_a_truncated_rank_reports_the_energy_kept_and_the_stored_scores(runs, tmp_path):
    report = headstart.merge([runs["s0"], runs["s1"], runs["s2"]], method="task_arithmetic", rank=1,
                             out=tmp_path / "r1", **MUTE)
    assert report["rank"] == 1 and 0 < report["energy"]["min"] < 1
    cfg = json.loads((tmp_path / "r1" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 1
    spec = headstart.load(tmp_path / "r1")
    stored = spec.manifest["metrics"]["accuracy"]
    assert stored == pytest.approx(spec.evaluate(runs["data_three"], progress=False)["accuracy"], abs=1e-4)


def test_finetune_specialists_merge_into_a_finetune_bundle(runs, tmp_path):
    report = headstart.merge([runs["ft0"], runs["ft1"]], method="soup", out=tmp_path / "ft", **MUTE)
    spec = headstart.load(tmp_path / "ft")
    assert spec.method.name == "finetune" and report["rank"] is None
    assert spec.manifest["metrics"]["accuracy"] == pytest.approx(
        spec.evaluate(runs["data_three"], progress=False)["accuracy"], abs=1e-4)


def test_merges_refuse_what_they_cannot_combine(runs, tmp_path):
    cases = [
        (dict(bundles=[runs["s0"]]), "two or more"),
        (dict(bundles=[runs["s0"], runs["ft0"]]), "one method"),
        (dict(bundles=[runs["s0"], runs["s1"]], method="ties", greedy_on="val"), "--method soup"),
        (dict(bundles=[runs["s0"], runs["s1"]], method="nonsense"), "unknown merge method"),
        (dict(bundles=[runs["s0"], runs["s1"]], method="linear", weights=[1.0]), "one per specialist"),
        (dict(bundles=[runs["s0"], runs["probe"]]), "one method"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(HeadstartError) as e:
            headstart.merge(**kwargs, **MUTE)
        assert needle in one_line(e), (kwargs, one_line(e))
    r = headstart_cli("merge", str(runs["s0"]), str(tmp_path / "missing"), "--method", "soup")
    assert_clean_error(r, "missing")


def test_image_merges_reestimate_batchnorm_and_keep_it_only_if_it_helps(tiny_image_folder, tmp_path):
    runs = []
    for seed in range(2):
        runs.append(tmp_path / f"img-s{seed}")
        headstart.fit(tiny_image_folder, base="tiny-image", method="lora", epochs=1, r=2, seed=seed, out=runs[-1],
                      **QUIET)
    report = headstart.merge(runs, method="soup", out=tmp_path / "img-soup", **MUTE)
    bn = report["batchnorm"]
    assert bn["reestimated_on"] > 0 and bn["kept"] == (bn["select_after"] >= bn["select_before"])
    spec = headstart.load(tmp_path / "img-soup")
    stored = spec.manifest["metrics"]["accuracy"]
    assert stored == pytest.approx(spec.evaluate(tiny_image_folder, split="val", progress=False)["accuracy"], abs=1e-4)


@pytest.mark.real
def test_real_minilm_specialists_merge_into_one_with_a_head_per_task(data_root, tmp_path):
    runs = []
    for name in ("trec", "sst2"):
        runs.append(tmp_path / name)
        # a seeded 300-row sample of each split: the merge re-encodes each task's recorded data to refit heads,
        # and all of sst2's 67k training rows made this one test take minutes
        data = sampled_copy(data_root / name, tmp_path / f"{name}-data", 300)
        headstart.fit(data, base="minilm-l6", method="lora", shots=24, epochs=2, out=runs[-1], **QUIET)
    report = headstart.merge(runs, method="ties", density=0.5, out=tmp_path / "both", **MUTE)
    for name in ("trec", "sst2"):
        t = report["tasks"][name]
        assert t["alone"] > 0.4 and t["normalized"] > 0.7, (name, t)  # a merge that kept most of each task
    spec = headstart.load(tmp_path / "both", head="sst2")
    assert set(spec.classes) == {"0", "1"} and spec.predict(["a wonderful , moving film"])[0] in ("0", "1")
