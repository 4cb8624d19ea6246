"""Unsupervised domain adaptation: the maths of coral/dann/selftrain/adabn on hand-made inputs,
labels hidden from the methods, `headstart.adapt` end to end on tiny shifted data (image and text,
every backbone mode), the guard and `auto`, resume of the two-domain loop, errors and the `adapt` /
`corrupt` commands."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import headstart
from headstart.experiments.adapt import CHECK_SHARE
from headstart.engine.batches import PairedDomains
from headstart.engine.checkpoint import Checkpointer
from headstart.engine.trainer import TrainSettings, train
from headstart.core.errors import ConfigError, DataError, TrainingError
from headstart.methods.adabn.method import Adabn, bn_layers, recompute_bn_statistics
from headstart.methods.base import loader_for
from headstart.methods.baselines.method import SourceOnly, TargetOracle
from headstart.methods.coral.maths import coral_loss, coral_transform, covariance
from headstart.methods.coral.method import Coral
from headstart.methods.dann.method import Dann
from headstart.methods.dann.modules import GradientReversal, grl_coefficient
from headstart.methods.probe.method import fit_linear_head
from headstart.methods.selftrain.method import Selftrain, select_pseudo_labels

from conftest import FILLER, TEXT_CLASSES, assert_clean_error, headstart_cli, text_rows, write_table

QUIET = {"progress": False, "log": lambda s: None}
REPORT_KEYS = {"source_only_accuracy", "accuracy", "oracle_accuracy", "gap_closed"}
IMAGE_METHODS = ("adabn", "coral", "dann", "selftrain")


def shifted_text_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """The tiny text task in another "domain": upper case and padded with extra filler words."""
    return [(" ".join(FILLER[(i + j) % len(FILLER)] for j in range(4)).upper() + " " + text.upper() + " TODAY",
             label) for i, (text, label) in enumerate(text_rows(n, seed))]


def target_images(folder: Path, n: int = 5) -> list[str]:
    return [str(p) for p in sorted((folder / "val").rglob("*.png"))][:n]


# ---- shared data and runs (module scope: each fit runs once) --------------------------------------

@pytest.fixture(scope="module")
def shifted_images(tiny_image_folder, tmp_path_factory) -> Path:
    """The tiny image folder darkened and noised: the same classes and files, a known shift."""
    out = tmp_path_factory.mktemp("adapt-shift") / "dark"
    headstart.corrupt_folder(tiny_image_folder, out, dark=0.5, noise=0.05, seed=0, **QUIET)
    return out


@pytest.fixture(scope="module")
def image_runs(tiny_image_folder, shifted_images, tmp_path_factory):
    """{method: (AdaptResult, bundle folder)} for the four methods in frozen mode, baselines shared."""
    return _adapt_each(tiny_image_folder, shifted_images, "tiny-image", IMAGE_METHODS,
                       tmp_path_factory.mktemp("adapt-image-runs"))


def _adapt_each(source, target, base: str, methods, root: Path) -> dict:
    """{method: (AdaptResult, bundle folder)}; the source-only / oracle baselines are trained once."""
    runs, baselines = {}, None
    for m in methods:
        out = root / m
        # guard=False: these runs test each method as trained (the guard might ship source-only instead)
        run = headstart.adapt(source, target, base=base, method=m, epochs=2, out=out, baselines=baselines,
                              guard=False, **QUIET)
        baselines = run.baselines
        runs[m] = (run, out)
    return runs


@pytest.fixture(scope="module")
def shifted_text_csv(tmp_path_factory) -> Path:
    """A labelled target table (60 rows, one file: split 80/20 by headstart) in the shifted text domain."""
    return write_table(tmp_path_factory.mktemp("adapt-text") / "target.csv", shifted_text_rows(60, seed=2))


@pytest.fixture(scope="module")
def text_runs(tiny_text_csv, shifted_text_csv, tmp_path_factory):
    return _adapt_each(tiny_text_csv, shifted_text_csv, "tiny-text", ("coral", "selftrain"),
                       tmp_path_factory.mktemp("adapt-text-runs"))


# ---- 1. CORAL maths ---------------------------------------------------------------------------------

def _correlated(n: int, d: int, seed: int, scale: float, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * scale + torch.eye(d) * scale
    return (torch.randn(n, d, generator=g) @ mix + shift * torch.randn(d, generator=g)).double()


def test_coral_transform_matches_target_mean_and_covariance():
    xs = _correlated(2000, 5, seed=0, scale=1.0, shift=0.0)
    xt = _correlated(2000, 5, seed=1, scale=2.5, shift=3.0)
    aligned = coral_transform(xs, xt, eps=1e-6)
    assert aligned.shape == xs.shape and aligned.dtype == xs.dtype
    torch.testing.assert_close(aligned.mean(0), xt.mean(0), atol=1e-8, rtol=0)
    ct = covariance(xt)
    rel = (covariance(aligned) - ct).norm() / ct.norm()
    assert rel < 1e-2, rel
    # Before the transform the covariances were far apart: the test can tell.
    assert (covariance(xs) - ct).norm() / ct.norm() > 0.5
    # float32 in, float32 out (the maths runs in float64 inside)
    assert coral_transform(xs.float(), xt.float()).dtype == torch.float32


def test_coral_transform_default_ridge_is_inexact_but_moves_towards_target():
    xs = _correlated(2000, 5, seed=0, scale=1.0, shift=0.0)
    xt = _correlated(2000, 5, seed=1, scale=2.5, shift=3.0)
    ct = covariance(xt)
    gap = lambda x: ((covariance(x) - ct).norm() / ct.norm()).item()  # noqa: E731
    assert gap(coral_transform(xs, xt, eps=1e-6)) < gap(coral_transform(xs, xt, eps=1.0)) < gap(xs)


def test_coral_loss_and_covariance():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 8, generator=g)
    assert coral_loss(f, f).item() == 0.0
    assert coral_loss(f, 3.0 * f).item() > 0.0
    assert coral_loss(f, f + 5.0).item() == pytest.approx(0.0, abs=1e-9)  # a shift leaves covariances alone
    # ||Cs - Ct||_F^2 / (4 d^2)
    expected = ((covariance(f) - covariance(2 * f)) ** 2).sum() / (4 * 8 * 8)
    torch.testing.assert_close(coral_loss(f, 2 * f), expected)
    torch.testing.assert_close(covariance(f), torch.cov(f.T))
    x = torch.randn(7, 3, generator=g).double()
    torch.testing.assert_close(covariance(x), torch.cov(x.T))


def test_coral_closes_a_known_feature_shift():
    """Target features are an affine transform of source-like features (scale along random axes + shift):
    a linear head trained on coral_transform(xs, xt) classifies xt far better than one trained on raw xs.
    (A symmetric positive-definite A: second-order statistics cannot identify a pure rotation.)"""
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0], [0, 0, 3.0, 0, 0]])

    def blobs(n):
        y = torch.arange(n) % 3
        return centers[y] + torch.randn(n, 5, generator=g), y

    xs, ys = blobs(600)
    xt0, yt = blobs(600)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    scales = torch.exp(torch.empty(5).uniform_(-1.5, 1.5, generator=g))
    a = q @ torch.diag(scales) @ q.T
    xt = xt0 @ a + 4 * torch.randn(5, generator=g)

    def target_accuracy(train_x):
        w, b = fit_linear_head(train_x, ys, 3, 1e-3)
        return ((xt @ w.T + b).argmax(-1) == yt).float().mean().item()

    raw, aligned = target_accuracy(xs), target_accuracy(coral_transform(xs, xt, eps=1e-3))
    source = ((xs @ fit_linear_head(xs, ys, 3, 1e-3)[0].T).argmax(-1) == ys).float().mean().item()
    assert aligned > 0.9 and source > 0.9, (aligned, source)
    assert aligned > raw + 0.3, (raw, aligned)


# ---- 2. gradient reversal -----------------------------------------------------------------------

def test_gradient_reversal_is_identity_forward_and_negates_backward():
    grl = GradientReversal()
    grl.coeff = 0.3
    x = torch.randn(4, 3, requires_grad=True)
    y = grl(x)
    assert torch.equal(y, x)
    upstream = torch.randn(4, 3)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -0.3 * upstream)
    # Through a loss: the reversed gradient is the plain one, negated and scaled.
    w = torch.randn(3)
    x1 = torch.randn(5, 3, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    grl.coeff = 2.0
    (grl(x1) @ w).square().sum().backward()
    (x2 @ w).square().sum().backward()
    torch.testing.assert_close(x1.grad, -2.0 * x2.grad)


def test_grl_coefficient_schedule():
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0, 10.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coefficient(1.0, 10.0) == pytest.approx(0.9999, abs=1e-4)
    values = [grl_coefficient(p / 50) for p in range(51)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert all(0.0 <= v < 1.0 for v in values)
    assert grl_coefficient(0.5, 1.0) < grl_coefficient(0.5, 10.0)  # gamma sets how fast it rises


# ---- 3. pseudo-labels ---------------------------------------------------------------------------

def _probs(pred: list[int], conf: list[float], c: int = 3) -> torch.Tensor:
    """Rows whose top class is `pred` with probability `conf`, the rest spread over the others."""
    p = torch.empty(len(pred), c)
    for i, (k, q) in enumerate(zip(pred, conf)):
        p[i] = (1 - q) / (c - 1)
        p[i, k] = q
    return p


def test_select_pseudo_labels_respects_the_threshold():
    probs = _probs([0, 1, 2, 0, 1, 2], [0.95, 0.5, 0.85, 0.79, 0.99, 0.6])
    idx, labels = select_pseudo_labels(probs, torch.full((3,), 1 / 3), threshold=0.8, share=1.0)
    assert sorted(zip(idx, labels)) == [(0, 0), (2, 2), (4, 1)]
    idx, labels = select_pseudo_labels(probs, torch.full((3,), 1 / 3), threshold=0.999, share=1.0)
    assert idx == [] and labels == []


def test_select_pseudo_labels_class_balance_guard_and_confidence_order():
    # The model predicts class 0 everywhere, very confidently: the guard still caps class 0.
    n = 20
    conf = [0.90 + 0.004 * ((7 * i) % n) for i in range(n)]  # distinct, shuffled confidences
    probs = _probs([0] * n, conf)
    prior = torch.tensor([0.3, 0.5, 0.2])
    share = 0.7
    idx, labels = select_pseudo_labels(probs, prior, threshold=0.5, share=share)
    cap = int(share * 0.3 * n)  # 4.2 -> 4
    assert cap == 4 and len(idx) == cap and labels == [0] * cap
    most_confident = sorted(range(n), key=lambda i: -conf[i])[:cap]
    assert idx == most_confident  # most confident first, in that order
    # Another class's quota is its own: two confident class-2 rows with prior 0.2 -> cap int(0.7*0.2*22) = 3.
    probs2 = torch.cat([probs, _probs([2, 2], [0.97, 0.96])])
    idx2, labels2 = select_pseudo_labels(probs2, prior, threshold=0.5, share=share)
    assert labels2.count(0) == int(share * 0.3 * 22) and labels2.count(2) == 2
    assert set(idx2) >= {20, 21}
    # share scales every quota: share 0.1 keeps int(0.1 * 0.3 * 20) = 0 of class 0.
    assert select_pseudo_labels(probs, prior, 0.5, 0.1) == ([], [])


# ---- 4. AdaBN --------------------------------------------------------------------------------------

def test_tiny_image_has_batchnorm():
    assert bn_layers(headstart.load_base("tiny-image"))


def test_recompute_bn_statistics_changes_only_bn_statistics(tiny_image_folder):
    backbone = headstart.load_base("tiny-image")
    layers = bn_layers(backbone)
    items = sorted(str(p) for p in (tiny_image_folder / "train").rglob("*.png"))
    assert len(items) == 24
    bn_prefixes = tuple(name + "." for name, _ in layers)
    params = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in backbone.named_buffers()}
    momenta = [m.momentum for _, m in layers]
    layers[1][1].momentum = 0.3  # a non-default momentum must come back too
    momenta[1] = 0.3
    backbone.eval()
    seen = []
    hook = layers[0][1].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    try:
        n = recompute_bn_statistics(backbone, items, loader_for("image"), batch_size=64, progress=False)
    finally:
        hook.remove()
    assert n == len(layers)
    for name, p in backbone.named_parameters():
        assert torch.equal(p, params[name]), f"parameter {name} changed"
    changed = 0
    for name, b in backbone.named_buffers():
        if name.startswith(bn_prefixes):
            changed += not torch.equal(b, buffers[name])
        else:
            assert torch.equal(b, buffers[name]), f"non-BN buffer {name} changed"
    assert changed >= 2 * len(layers)  # running_mean and running_var of every layer
    # One batch with momentum None: the running statistics are exactly that batch's.
    assert len(seen) == 1
    x = seen[0].double()
    first = layers[0][1]
    torch.testing.assert_close(first.running_mean.double(), x.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first.running_var.double(), x.var((0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-4)
    assert int(first.num_batches_tracked) == 1
    assert [m.momentum for _, m in layers] == momenta
    assert not any(m.training for m in backbone.modules()), "eval mode must be restored"


def test_recompute_bn_statistics_restores_train_mode(tiny_image_folder):
    backbone = headstart.load_base("tiny-image")
    items = sorted(str(p) for p in (tiny_image_folder / "train").rglob("*.png"))[:10]
    backbone.train()
    recompute_bn_statistics(backbone, items, loader_for("image"), batch_size=4, progress=False)
    assert all(m.training for _, m in bn_layers(backbone))
    assert all(m.momentum == 0.1 for _, m in bn_layers(backbone))
    assert all(int(m.num_batches_tracked) == 3 for _, m in bn_layers(backbone))  # 4 + 4 + 2 images
    still_eval = [n for n, m in backbone.named_modules() if not m.training]
    assert not still_eval, f"train mode not restored for {still_eval[:3]}"


def test_adabn_refuses_a_base_without_batchnorm(tiny_text_csv):
    assert not bn_layers(headstart.load_base("tiny-text"))
    with pytest.raises(ConfigError, match="BatchNorm"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="adabn", target=tiny_text_csv / "test.csv", **QUIET)


# ---- 5. end to end on a known shift -----------------------------------------------------------------

def _check_report(report: dict, method: str, target_examples: int) -> None:
    assert REPORT_KEYS <= set(report)
    for k in ("source_only_accuracy", "accuracy", "oracle_accuracy"):
        assert isinstance(report[k], float) and 0.0 <= report[k] <= 1.0, (k, report[k])
    gap = report["gap_closed"]
    assert gap is None or isinstance(gap, float)
    if gap is not None:
        so, acc, oracle = report["source_only_accuracy"], report["accuracy"], report["oracle_accuracy"]
        assert gap == pytest.approx((acc - so) / (oracle - so))
    assert report["method"] == report["shipped"] == method and report["backbone"] == "frozen"
    assert "guard" not in report
    assert report["target_examples"] == target_examples


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_adapt_image_report_and_bundle(image_runs, shifted_images, tiny_image_folder, method):
    run, out = image_runs[method]
    target = headstart.load_dataset(shifted_images)
    _check_report(run.report, method, len(target.split("train")))
    assert run.report["target_examples"] == 24 and run.report["source_examples"] == 24
    assert run.report["test_examples"] == len(target.split("val")) == 24
    assert run.report["bundle"] == str(out)
    assert set(run.baselines) == {"source-only", "target-oracle"}
    assert run.baselines["source-only"] is image_runs["adabn"][0].baselines["source-only"]  # reused, not refit
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["name"] == method
    assert manifest["adaptation"]["accuracy"] == pytest.approx(run.report["accuracy"])
    assert manifest["adaptation"]["source_only_accuracy"] == pytest.approx(run.report["source_only_accuracy"])
    xs = target_images(shifted_images)
    loaded = headstart.load(out)
    torch.testing.assert_close(loaded.predict_proba(xs), run.specialist.predict_proba(xs), atol=1e-5, rtol=0)


def test_adabn_bundle_carries_target_statistics(image_runs, shifted_images):
    run, out = image_runs["adabn"]
    stored = load_file(out / "trained.safetensors")
    bn = [k for k in stored if k.startswith("backbone.")]
    assert bn and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in bn)
    fresh = headstart.load_base("tiny-image").state_dict()
    key = next(k for k in bn if k.endswith("running_mean"))
    assert not torch.equal(stored[key], fresh[key.removeprefix("backbone.")])
    # The source-only model (same base, source statistics) predicts differently on the dark images.
    xs = target_images(shifted_images)
    assert not torch.allclose(run.specialist.predict_proba(xs), run.baselines["source-only"].predict_proba(xs))


@pytest.mark.parametrize("method", ("coral", "selftrain"))
def test_adapt_text_report_and_bundle(text_runs, shifted_text_csv, method):
    run, out = text_runs[method]
    target = headstart.load_dataset(shifted_text_csv)
    _check_report(run.report, method, len(target.split("train")))
    assert run.report["test_examples"] == len(target.split("test"))
    xs = target.split("test").items[:5]
    torch.testing.assert_close(headstart.load(out).predict_proba(xs), run.specialist.predict_proba(xs),
                               atol=1e-5, rtol=0)


# ---- 6. labels are hidden ------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _recording(monkeypatch, cls, seen: dict, name: str, call_through: bool):
    original = cls.fit

    def fit(self, backbone, data, ctx):
        seen[name] = ctx.target
        if not call_through:
            raise _Stop
        return original(self, backbone, data, ctx)

    monkeypatch.setattr(cls, "fit", fit)


@pytest.mark.parametrize("method,cls", [("coral", Coral), ("dann", Dann), ("selftrain", Selftrain), ("adabn", Adabn),
                                        ("target-oracle", TargetOracle)])
def test_fit_hides_target_labels_from_adaptation_methods(monkeypatch, tiny_image_folder, shifted_images, method, cls):
    seen: dict = {}
    _recording(monkeypatch, cls, seen, method, call_through=False)
    with pytest.raises(_Stop):
        headstart.fit(tiny_image_folder, base="tiny-image", method=method, target=shifted_images, **QUIET)
    target = seen[method]
    truth = headstart.load_dataset(shifted_images).split("train")
    assert list(target.items) == list(truth.items)
    if method == "target-oracle":
        assert all(y >= 0 for y in target.labels) and list(target.labels) == list(truth.labels)
    else:
        assert list(target.labels) == [-1] * len(truth)


def test_adapt_hides_target_labels_from_all_but_the_oracle(monkeypatch, tiny_image_folder, shifted_images):
    seen: dict = {}
    for name, cls in (("source-only", SourceOnly), ("dann", Dann), ("target-oracle", TargetOracle)):
        _recording(monkeypatch, cls, seen, name, call_through=True)
    run = headstart.adapt(tiny_image_folder, shifted_images, base="tiny-image", method="dann", epochs=1, **QUIET)
    truth = headstart.load_dataset(shifted_images).split("train")
    assert set(seen) == {"source-only", "dann", "target-oracle"}
    # the guard (on by default) holds a seeded 20% of the target back from every method to check them on
    kept = len(truth) - round(CHECK_SHARE * len(truth))
    assert list(seen["dann"].labels) == [-1] * kept == list(seen["source-only"].labels)
    assert set(seen["dann"].items) < set(truth.items) and run.report["guard"]["checked_target_examples"] == (
        len(truth) - kept)
    assert list(seen["target-oracle"].labels) == list(truth.labels) and min(truth.labels) >= 0
    assert run.report["target_examples"] == len(truth)


# ---- 7. the guard: label-free checks decide what ships ------------------------------------------------

def test_auto_fits_every_method_the_base_allows_and_ships_the_highest_estimate(text_runs, tiny_text_csv,
                                                                              shifted_text_csv, tmp_path):
    baselines = text_runs["coral"][0].baselines
    run = headstart.adapt(tiny_text_csv, shifted_text_csv, base="tiny-text", method="auto", epochs=2,
                          baselines=baselines, out=tmp_path / "auto", **QUIET)
    report, guard = run.report, run.report["guard"]
    assert set(guard["checks"]) == {"source-only", "coral", "dann", "selftrain"}  # adabn: no BatchNorm here
    for checks in guard["checks"].values():
        assert set(checks) == {"estimated_accuracy", "class_share_bound", "reverse_accuracy", "entropy",
                               "largest_share", "agreement"}
        assert all(0.0 <= v <= 1.0 for v in checks.values()), checks
        assert checks["estimated_accuracy"] <= checks["class_share_bound"]
    assert guard["checks"]["source-only"]["agreement"] == 1.0
    first = max(guard["checks"], key=lambda n: (guard["checks"][n]["estimated_accuracy"], n == "source-only"))
    assert report["shipped"] == guard["shipped"] == first and report["method"] == "auto"
    assert set(report["candidate_accuracy"]) == set(guard["checks"])
    assert report["accuracy"] == report["candidate_accuracy"][first]
    assert report["source_only_accuracy"] == report["candidate_accuracy"]["source-only"]
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert manifest["method"]["name"] == first and manifest["adaptation"]["guard"]["why"] == guard["why"]


def test_a_guard_that_keeps_source_only_ships_a_copy_and_says_why(monkeypatch, text_runs, tiny_text_csv,
                                                                  shifted_text_csv, tmp_path):
    from headstart.experiments import adapt_checks

    monkeypatch.setattr(adapt_checks, "choose", lambda checks: ("source-only", "kept source-only: the test says so"))
    baselines = text_runs["coral"][0].baselines
    logs: list[str] = []
    run = headstart.adapt(tiny_text_csv, shifted_text_csv, base="tiny-text", method="selftrain", epochs=2,
                          baselines=baselines, out=tmp_path / "kept", progress=False, log=logs.append)
    report = run.report
    assert report["method"] == "selftrain" and report["shipped"] == "source-only"
    assert "guard: kept source-only: the test says so" in logs
    assert report["accuracy"] == report["source_only_accuracy"] and set(report["candidate_accuracy"]) == {
        "source-only", "selftrain"}
    assert report["gap_closed"] in (None, 0.0)
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert manifest["method"]["name"] == "source-only"
    assert manifest["adaptation"]["guard"]["why"] == "kept source-only: the test says so"
    # the baseline itself is untouched: reused by later runs, its manifest must not carry this run's report
    assert run.specialist is not baselines["source-only"] and "adaptation" not in baselines["source-only"].manifest
    xs = headstart.load_dataset(shifted_text_csv).split("test").items[:5]
    torch.testing.assert_close(headstart.load(tmp_path / "kept").predict_proba(xs),
                               baselines["source-only"].predict_proba(xs), atol=1e-5, rtol=0)


# ---- 8. errors -----------------------------------------------------------------------------------

def test_adaptation_method_without_target_is_a_config_error(tiny_text_csv):
    with pytest.raises(ConfigError, match="target"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="dann", **QUIET)


def test_ordinary_method_with_target_is_a_config_error(tiny_text_csv):
    with pytest.raises(ConfigError, match="does not use target"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="probe", target=tiny_text_csv / "test.csv", **QUIET)


@pytest.mark.parametrize("method", ("probe", "target-oracle"))
def test_adapt_refuses_non_adaptation_methods(tiny_text_csv, shifted_text_csv, method):
    with pytest.raises(ConfigError, match="not an adaptation method"):
        headstart.adapt(tiny_text_csv, shifted_text_csv, base="tiny-text", method=method, **QUIET)


def test_target_with_a_class_the_source_lacks_is_a_data_error(tiny_text_csv, tmp_path):
    rows = text_rows(24, seed=3) + [(f"guitar song number {i}", "music") for i in range(6)]
    target = write_table(tmp_path / "target.csv", rows)
    with pytest.raises(DataError, match="music"):
        headstart.adapt(tiny_text_csv, target, base="tiny-text", method="coral", **QUIET)
    with pytest.raises(DataError, match="music"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="coral", target=target, **QUIET)


def test_unlabelled_target_table(tiny_text_csv, tmp_path):
    rows = [(text,) for text, _ in shifted_text_rows(40, seed=4)]
    target = write_table(tmp_path / "unlabelled.csv", rows, columns=("text",))
    with pytest.raises(DataError, match="--target-unlabelled"):
        headstart.adapt(tiny_text_csv, target, base="tiny-text", method="coral", **QUIET)
    with pytest.raises(ConfigError, match="oracle"):
        headstart.adapt(tiny_text_csv, target, base="tiny-text", method="coral", target_unlabelled=True,
                        oracle=True, **QUIET)
    run = headstart.adapt(tiny_text_csv, target, base="tiny-text", method="coral", target_unlabelled=True,
                          target_test=tiny_text_csv / "test.csv", **QUIET)
    assert run.report["oracle_accuracy"] is None and run.report["gap_closed"] is None
    assert 0.0 <= run.report["accuracy"] <= 1.0 and 0.0 <= run.report["source_only_accuracy"] <= 1.0
    assert run.report["target_examples"] == 40 and run.report["test_examples"] == 30
    assert "target-oracle" not in run.baselines
    # Without labelled test data nothing measures the target, and the report says so.
    run = headstart.adapt(tiny_text_csv, target, base="tiny-text", method="coral", target_unlabelled=True,
                          baselines=run.baselines, **QUIET)
    assert all(run.report[k] is None for k in REPORT_KEYS) and "target_test" in run.report["note"]



def test_a_target_of_one_example_leaves_the_guard_nothing_to_check_on(tiny_text_csv, tmp_path):
    target = write_table(tmp_path / "one.csv", [("A LONE SHIFTED REVIEW TODAY",)], columns=("text",))
    with pytest.raises(ConfigError, match="--no-guard"):
        headstart.adapt(tiny_text_csv, target, base="tiny-text", method="coral", target_unlabelled=True, **QUIET)


# ---- 9. backbone modes and resume ------------------------------------------------------------------

def test_dann_lora_bundle(tiny_text_csv, shifted_text_csv, tmp_path):
    out = tmp_path / "dann-lora"
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="dann", target=shifted_text_csv, backbone="lora",
                         r=2, epochs=1, bottleneck=16, hidden=16, out=out, **QUIET)
    assert spec.manifest["method"]["config"]["backbone"] == "lora" and spec.manifest["method"]["config"]["r"] == 2
    assert (out / "adapter").is_dir()
    keys = set(load_file(out / "trained.safetensors"))
    assert keys and all(k.startswith("head.") for k in keys), sorted(keys)[:5]
    assert not any(k.startswith("backbone.") for k in keys)
    assert {"head.classifier.weight", "head.bottleneck.0.weight"} <= keys
    lora = [p for n, p in spec.model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    xs = headstart.load_dataset(shifted_text_csv).split("test").items[:6]
    torch.testing.assert_close(headstart.load(out).predict_proba(xs), spec.predict_proba(xs), atol=1e-5, rtol=0)


def test_coral_finetune_bundle(tiny_text_csv, shifted_text_csv, tmp_path):
    out = tmp_path / "coral-ft"
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="coral", target=shifted_text_csv,
                         backbone="finetune", unfreeze="1", epochs=1, out=out, **QUIET)
    assert spec.manifest["method"]["config"]["backbone"] == "finetune"
    assert {"ce", "coral"} <= set(spec.manifest["history"][0])
    keys = set(load_file(out / "trained.safetensors"))
    body = {k for k in keys if k.startswith("backbone.")}
    assert {"head.weight", "head.bias"} <= keys
    assert body and len(body) < len(spec.model.backbone.state_dict()), "unfreeze=1 stores the top block only"
    xs = headstart.load_dataset(shifted_text_csv).split("test").items[:6]
    torch.testing.assert_close(headstart.load(out).predict_proba(xs), spec.predict_proba(xs), atol=1e-5, rtol=0)


def _toy_two_domain(epochs: int, checkpoint_dir=None, resume=False, interrupt_at_epoch=None, fingerprint=None,
                    log=lambda s: None):
    """A linear classifier trained with cross-entropy + CORAL on tiny tensors."""
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(20, 4, generator=g), 2 * torch.randn(12, 4, generator=g) + 1
    labels = (torch.arange(20) % 3).tolist()
    torch.manual_seed(0)
    modules = nn.ModuleDict({"model": nn.Linear(4, 3)})
    batch, steps = 8, 3  # ceil(20 / 8) steps per epoch

    def step_loss(fs, ys, ft, p):
        if interrupt_at_epoch is not None and p >= (interrupt_at_epoch - 1) * steps / (steps * epochs) - 1e-9:
            raise KeyboardInterrupt
        lin = modules["model"]
        ce = F.cross_entropy(lin(fs), ys)
        align = coral_loss(lin(fs), lin(ft))
        return ce + align, {"ce": ce.item()}

    def step(pair, p):
        s_idx, t_idx = pair
        loss, stats = step_loss(xs[s_idx], torch.tensor(labels)[s_idx], xt[t_idx], p)
        return loss, stats, len(s_idx)

    groups = [{"params": list(modules.parameters()), "lr": 0.05}]
    result = train(modules, plan=PairedDomains(20, 12, batch, epochs), step_loss=step, param_groups=groups,
                   settings=TrainSettings(lr_schedule=lambda s, total: 1.0 - 0.5 * s / total),
                   checkpoint=Checkpointer(checkpoint_dir, fingerprint=fingerprint, resume=resume),
                   progress=False, log=log)
    out = {"history": result.history}
    return modules, out


def test_two_domain_loop_resumes_after_an_interrupt(tmp_path):
    full, full_out = _toy_two_domain(3)
    assert [row["epoch"] for row in full_out["history"]] == [1, 2, 3]
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _toy_two_domain(3, checkpoint_dir=ckpt, interrupt_at_epoch=3, fingerprint={"run": 1})
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1  # epochs 1 and 2 were saved
    logs: list[str] = []
    resumed, out = _toy_two_domain(3, checkpoint_dir=ckpt, resume=True, fingerprint={"run": 1}, log=logs.append)
    assert any("resumed" in line for line in logs)
    assert [row["epoch"] for row in out["history"]] == [1, 2, 3]
    for a, b in zip(out["history"], full_out["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["ce"] == pytest.approx(b["ce"], abs=1e-6)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), full.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    # The weights did train: not the initial ones.
    torch.manual_seed(0)
    assert not torch.allclose(nn.Linear(4, 3).weight, full["model"].weight)
    with pytest.raises(TrainingError, match="different run"):
        _toy_two_domain(3, checkpoint_dir=ckpt, resume=True, fingerprint={"run": 2})


# ---- 10. the command line --------------------------------------------------------------------------

def test_cli_adapt_then_evaluate(tiny_image_folder, shifted_images, tmp_path):
    out = tmp_path / "cli-coral"
    result = headstart_cli("adapt", "--source", tiny_image_folder, "--target", shifted_images, "--base", "tiny-image",
                           "--method", "coral", "--json", "--out", out)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-5:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert REPORT_KEYS <= set(report)
    for k in ("source_only_accuracy", "accuracy", "oracle_accuracy"):
        assert 0.0 <= report[k] <= 1.0
    assert report["method"] == "coral" and report["target_examples"] == 24 and (out / "manifest.json").is_file()
    assert report["shipped"] == report["guard"]["shipped"] in ("coral", "source-only")  # the guard is on by default
    assert json.loads((out / "manifest.json").read_text())["method"]["name"] == report["shipped"]
    result = headstart_cli("evaluate", out, shifted_images, "--json")
    assert result.returncode == 0, result.stderr.strip().splitlines()[-5:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["examples"] == 24 and metrics["split"] == "val"
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])  # the report measured the same split


def test_cli_corrupt(tiny_image_folder, tmp_path):
    out = tmp_path / "dark"
    with ThreadPoolExecutor(2) as pool:  # two independent commands: start both (most of each is import time)
        good = pool.submit(headstart_cli, "corrupt", tiny_image_folder, "--dark", "0.4", "--out", out)
        bad = pool.submit(headstart_cli, "corrupt", tiny_image_folder, "--dark", "1.5", "--out", tmp_path / "bad")
        result, bad = good.result(), bad.result()
    assert result.returncode == 0, result.stderr.strip().splitlines()[-5:]
    info = json.loads((out / "CORRUPTION.json").read_text())
    assert info["dark"] == 0.4 and info["images"] == 48
    assert len(list(out.rglob("*.png"))) == 48
    assert_clean_error(bad, "dark")
    assert not (tmp_path / "bad").exists()


# ---- 11. evaluating a single table file -------------------------------------------------------------

def test_evaluate_single_table_uses_every_row(text_runs, tmp_path):
    _, bundle = text_runs["coral"]
    table = write_table(tmp_path / "eval.csv", text_rows(37, seed=9))
    metrics = headstart.load(bundle).evaluate(table)
    assert metrics["examples"] == 37
    assert headstart.evaluate(bundle, table)["examples"] == 37
    assert set(metrics["per_class_f1"]) == set(TEXT_CLASSES)
