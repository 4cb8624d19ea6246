"""The `headstart` command, run as a user runs it: the venv's console script in a subprocess."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEXT_CLASSES, assert_clean_error, text_rows, write_table
from conftest import headstart_cli as headstart

HEADLINE_KEYS = {"accuracy", "macro_f1", "wall_s", "trainable_params", "skipped"}


@pytest.fixture(scope="module")
def fitted(tiny_text_csv, tmp_path_factory):
    """`headstart fit ... --json` once: (completed process, bundle folder)."""
    out = tmp_path_factory.mktemp("cli") / "trec-like"
    result = headstart("fit", tiny_text_csv, "--base", "tiny-text", "--method", "finetune", "--epochs", "1",
                       "--lr", "1e-3", "--seed", "1", "--out", out, "--json")
    assert result.returncode == 0, result.stderr.strip().splitlines()[-5:]
    return result, out


def test_fit_json_last_line(fitted):
    result, out = fitted
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert HEADLINE_KEYS <= set(last)
    assert 0 <= last["accuracy"] <= 1 and 0 <= last["macro_f1"] <= 1
    assert last["trainable_params"] > 0 and last["wall_s"] > 0 and last["skipped"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["config"]["lr"] == 1e-3 and manifest["method"]["config"]["epochs"] == 1
    assert manifest["seed"] == 1
    assert manifest["metrics"]["accuracy"] == last["accuracy"]


# ---- errors: one line, exit code 2, no traceback --------------------------------------------

def test_error_missing_path(tmp_path):
    assert_clean_error(headstart("fit", tmp_path / "nowhere", "--base", "tiny-text"), "no such file")


def test_error_unknown_base(tiny_text_csv):
    assert_clean_error(headstart("fit", tiny_text_csv, "--base", "no-such-base"), "unknown base", "no-such-base")


def test_error_unknown_method(tiny_text_csv):
    assert_clean_error(headstart("fit", tiny_text_csv, "--base", "tiny-text", "--method", "no-such-method"),
                       "unknown method", "no-such-method")


def test_error_one_class(tmp_path):
    data = write_table(tmp_path / "one.csv", [(f"text number {i}", "only") for i in range(12)])
    assert_clean_error(headstart("fit", data, "--base", "tiny-text"), "one class")


def test_error_evaluate_on_unseen_labels(fitted, tmp_path):
    _, out = fitted
    rows = text_rows(24, seed=0) + [(f"guitar song {i}", "music") for i in range(8)]
    write_table(tmp_path / "data" / "train.csv", rows)
    write_table(tmp_path / "data" / "test.csv", rows[::2])
    assert_clean_error(headstart("evaluate", out, tmp_path / "data", "--json"), "never saw", "music")


# ---- the other commands ---------------------------------------------------------------------

def test_predict_text_prints_a_label(fitted):
    _, out = fitted
    result = headstart("predict", out, "the team scored a goal")
    assert result.returncode == 0, result.stderr.strip().splitlines()[-3:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    label, score, text = lines[0].split("\t")[:3]
    assert label in TEXT_CLASSES and 0 <= float(score) <= 1 and text == "the team scored a goal"


def test_predict_json(fitted):
    _, out = fitted
    result = headstart("predict", out, "pizza and cheese", "my laptop", "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr.strip().splitlines()[-3:]
    preds = json.loads(result.stdout.strip().splitlines()[-1])["predictions"]
    assert [p["input"] for p in preds] == ["pizza and cheese", "my laptop"]
    for p in preds:
        assert p["label"] in TEXT_CLASSES and 0 <= p["score"] <= 1
        assert len(p["top"]) == 2 and p["top"][0]["label"] == p["label"]


def test_info(fitted):
    _, out = fitted
    result = headstart("info", out)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-3:]
    text = result.stdout
    assert "tiny-text" in text and "finetune" in text
    assert all(c in text for c in TEXT_CLASSES)
    assert "manifest.json" in text and "trained.safetensors" in text


def test_evaluate_json(fitted, tiny_text_csv):
    _, out = fitted
    result = headstart("evaluate", out, tiny_text_csv, "--json")
    assert result.returncode == 0, result.stderr.strip().splitlines()[-3:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    assert m["split"] == "test" and m["examples"] == 30
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert set(m["per_class_f1"]) == set(TEXT_CLASSES)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert m["accuracy"] == pytest.approx(manifest["metrics"]["accuracy"])


@pytest.fixture(scope="module")
def fit_help():
    return headstart("fit", "--help")


def test_fit_help_lists_options_with_help_text(fit_help):
    assert fit_help.returncode == 0, fit_help.stderr.strip().splitlines()[-3:]
    for flag in ("--base", "--method", "--out", "--shots", "--seed", "--resume", "--json"):
        assert flag in fit_help.stdout, flag
    assert "Specialise a base" in fit_help.stdout  # the docstring is the description
    text = " ".join(fit_help.stdout.split())
    assert "--l2-grid" in text and "held-out 10% of train" in text  # probe's options (the default method)


def test_fit_help_lists_epochs_as_a_common_option(fit_help):
    """The issue lists `--epochs N` among the common `fit` options, beside --shots/--seed/--out/--json."""
    assert fit_help.returncode == 0, fit_help.stderr.strip().splitlines()[-3:]
    assert "--epochs" in fit_help.stdout


def test_fit_help_lists_method_options_with_help_text():
    result = headstart("fit", "--method", "finetune", "--help")
    assert result.returncode == 0, result.stderr.strip().splitlines()[-3:]
    text = " ".join(result.stdout.split())
    assert "--lr LR Peak learning rate" in text
    assert "--unfreeze" in text and "--layer-decay" in text and "--epochs" in text


def test_methods_lists_all_four():
    result = headstart("methods")
    assert result.returncode == 0, result.stderr.strip().splitlines()[-3:]
    names = {line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    assert {"probe", "finetune", "lora", "scratch"} <= names
    assert "--lr" in result.stdout and "--r " in result.stdout
