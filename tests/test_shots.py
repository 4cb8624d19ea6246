"""The accuracy-vs-shots harness (`headstart.run_shots`, `headstart shots`) on the tiny bases."""
from __future__ import annotations

import hashlib
import json
import statistics

import pytest
from conftest import BIN, run_cmd

import headstart
from headstart import api
from headstart.bases import load_base
from headstart.core.errors import ConfigError, DataError, UnknownMethodError
from headstart.methods import registry
from headstart.methods.base import Method
from headstart.methods.probe.config import ProbeConfig
from headstart.experiments.shots import format_shots_table, run_shots

RESULT_KEYS = {"method", "shots", "mean", "std", "seeds", "train_s"}
FAST = {"finetune": {"epochs": 1}}


def spy_fit(monkeypatch, fail_on_call: int | None = None) -> list[dict]:
    """Record what every `api.fit` call trained on; optionally crash (not a HeadstartError) on call N."""
    calls: list[dict] = []
    real = api.fit

    def fit(data, *args, **kw):
        calls.append({"method": kw["method"], "seed": kw["seed"], "items": list(data.split("train").items),
                      "shots": data.sampling.get("shots")})
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise RuntimeError("interrupted")
        return real(data, *args, **kw)

    monkeypatch.setattr(api, "fit", fit)
    return calls


@pytest.fixture(scope="module")
def text_run(tiny_text_csv, tmp_path_factory):
    """probe + finetune, shots 0/2/4, 2 seeds, on tiny-text: (result, fit calls, out folder, log lines)."""
    out = tmp_path_factory.mktemp("shots") / "run"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        calls = spy_fit(mp)
        result = run_shots(tiny_text_csv, base="tiny-text", methods=["probe", "finetune"], shots=[4, 0, 2], seeds=2,
                           out=out, method_options=FAST, log=lines.append)
    return result, calls, out, lines


def test_same_sample_for_every_method(text_run, tiny_text_csv):
    result, calls, _, _ = text_run
    seen: dict[tuple[int, int], dict[str, list]] = {}
    for c in calls:
        seen.setdefault((c["shots"], c["seed"]), {})[c["method"]] = c["items"]
    assert set(seen) == {(2, 0), (2, 1), (4, 0), (4, 1)}  # 0 shots skipped: both methods need examples
    data = headstart.load_dataset(tiny_text_csv)
    for (k, s), by_method in seen.items():
        assert set(by_method) == {"probe", "finetune"}
        assert by_method["probe"] == by_method["finetune"] == data.with_shots(k, s).split("train").items
        assert len(by_method["probe"]) == 3 * k
        digest = hashlib.sha256(json.dumps([by_method["probe"], data.with_shots(k, s).split("train").labels])
                                .encode()).hexdigest()
        assert result["samples"][f"{k}/{s}"] == digest
    assert seen[(2, 0)]["probe"] != seen[(2, 1)]["probe"]  # seeds do sample differently


def test_results_aggregate_runs(text_run):
    result, _, _, lines = text_run
    assert result["eval_split"] == "test" and result["base"] == "tiny-text" and result["complete"]
    assert [(r["method"], r["shots"]) for r in result["results"]] == [("probe", 2), ("probe", 4),
                                                                      ("finetune", 2), ("finetune", 4)]
    assert len(result["runs"]) == 8 and not any("error" in r for r in result["runs"])
    for row in result["results"]:
        assert set(row) == RESULT_KEYS
        runs = [r for r in result["runs"] if (r["method"], r["shots"]) == (row["method"], row["shots"])]
        assert sorted(r["seed"] for r in runs) == [0, 1] and row["seeds"] == 2
        accs = [r["accuracy"] for r in runs]
        assert row["mean"] == pytest.approx(statistics.fmean(accs), abs=1e-4)
        assert row["std"] == pytest.approx(statistics.stdev(accs), abs=1e-4)
        assert row["train_s"] == pytest.approx(statistics.fmean(r["train_s"] for r in runs), abs=1e-3)
        assert all(0 <= a <= 1 and 0 <= r["macro_f1"] <= 1 for a, r in zip(accs, runs))
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 8 and progress[0].startswith("[1/8] probe") and "eta" in progress[0]
    assert sum("skips 0 shots" in line for line in lines) == 2  # one note per method, not per run


def test_files_written(text_run):
    result, _, out, _ = text_run
    assert json.loads((out / "shots.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "shots.md").read_text()
    assert table.strip() == format_shots_table(result).strip()
    probe_row = next(line for line in table.splitlines() if line.startswith("| probe"))
    cells = [c.strip() for c in probe_row.strip("|").split("|")]
    mean2 = next(r for r in result["results"] if (r["method"], r["shots"]) == ("probe", 2))
    assert cells[0] == "probe" and cells[1] == "" and cells[2] == f"{mean2['mean']:.3f} ± {mean2['std']:.3f}"


def test_seed_list_and_bundles_and_loaded_base_untouched(tiny_text_csv, tmp_path):
    base = load_base("tiny-text")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = run_shots(tiny_text_csv, base=base, methods=["finetune"], shots=[2], seeds=[3, 7], out=tmp_path,
                       save_bundles=True, method_options=FAST, log=lambda s: None)
    assert sorted(r["seed"] for r in result["runs"]) == [3, 7] and set(result["samples"]) == {"2/3", "2/7"}
    assert result["results"][0]["seeds"] == 2
    for s in (3, 7):
        manifest = json.loads((tmp_path / "bundles" / f"finetune-2shot-seed{s}" / "manifest.json").read_text())
        assert manifest["seed"] == s and manifest["data"]["train_examples"] == 6
    after = base.state_dict()
    assert all(v.equal(after[k]) for k, v in before.items()), "every fit must train a copy of the base"


def test_interrupted_run_keeps_finished_runs(tiny_text_csv, tmp_path, monkeypatch):
    spy_fit(monkeypatch, fail_on_call=3)
    with pytest.raises(RuntimeError, match="interrupted"):  # not a HeadstartError: it propagates
        run_shots(tiny_text_csv, base="tiny-text", methods=["probe"], shots=[2, 4], seeds=2, out=tmp_path,
                  log=lambda s: None)
    saved = json.loads((tmp_path / "shots.json").read_text())
    assert not saved["complete"] and len(saved["runs"]) == 2
    assert [(r["method"], r["shots"], r["seeds"]) for r in saved["results"]] == [("probe", 2, 2)]
    assert "2 shots" in (tmp_path / "shots.md").read_text() and not (tmp_path / "shots.png").exists()


class TextOnly(Method):
    """A stand-in for a method that does not support image bases."""

    def fit(self, backbone, data, ctx):
        raise DataError(f"textonly does not support {backbone.kind} bases")


def test_failing_method_is_recorded_and_the_rest_continue(tiny_image_folder, monkeypatch):
    headstart.list_methods()  # builtins first, so the stand-in is removed cleanly afterwards
    monkeypatch.setitem(registry._METHODS, ("classify", "textonly"), registry.MethodSpec("textonly", ProbeConfig, TextOnly, ""))
    lines: list[str] = []
    result = run_shots(tiny_image_folder, base="tiny-image", methods=["zeroshot", "textonly", "probe"], shots=[2],
                       seeds=2, log=lines.append)
    assert result["eval_split"] == "val"
    zs = [r for r in result["runs"] if r["method"] == "zeroshot"]  # tiny-image has no text tower
    assert len(zs) == 1 and "text tower" in zs[0]["error"]
    failed = [r for r in result["runs"] if r["method"] == "textonly"]
    assert len(failed) == 2 and all("does not support image" in r["error"] for r in failed)
    assert [(r["method"], r["seeds"]) for r in result["results"]] == [("probe", 2)]
    assert sum(line.startswith("textonly: failed") for line in lines) == 1  # logged once per method
    assert "failed" in next(line for line in format_shots_table(result).splitlines() if "textonly" in line)


def test_bad_arguments_fail_before_any_run(tiny_text_csv, tiny_image_folder):
    with pytest.raises(UnknownMethodError, match="nope"):
        run_shots(tiny_text_csv, base="tiny-text", methods=["probe", "nope"], shots=[2], seeds=1)
    with pytest.raises(ConfigError):
        run_shots(tiny_text_csv, base="tiny-text", methods=["probe"], shots=[2, -1], seeds=1)
    with pytest.raises(ConfigError, match="output folder"):
        run_shots(tiny_text_csv, base="tiny-text", methods=["probe"], shots=[2], seeds=1, save_bundles=True)
    with pytest.raises(DataError, match="text base"):
        run_shots(tiny_image_folder, base="tiny-text", methods=["probe"], shots=[2], seeds=1)


def test_zeroshot_runs_once_at_zero_and_prototype_skips_it(tiny_text_csv, tmp_path):
    lines: list[str] = []
    result = run_shots(tiny_text_csv, base="tiny-text", methods=["zeroshot", "prototype"], shots=[2, 4], seeds=2,
                       out=tmp_path, log=lines.append)
    zs = [r for r in result["runs"] if r["method"] == "zeroshot"]
    assert [(r["shots"], r["seed"]) for r in zs] == [(0, 0)]  # once, though 0 is not in the shot list
    assert {(r["shots"], r["seed"]) for r in result["runs"] if r["method"] == "prototype"} == \
        {(2, 0), (2, 1), (4, 0), (4, 1)}
    row = next(r for r in result["results"] if r["method"] == "zeroshot")
    assert (row["shots"], row["std"], row["seeds"]) == (0, 0.0, 1)
    table = format_shots_table(result).splitlines()
    header, zs_row = table[2], next(line for line in table if line.startswith("| zeroshot"))
    assert header.split("|")[2].strip() == "0 shots"  # the 0 column exists for the example-free method
    assert zs_row.split("|")[2].strip() == f"{row['mean']:.3f} ± 0.000"
    assert (tmp_path / "shots.png").read_bytes()[:4] == b"\x89PNG"
    result = run_shots(tiny_text_csv, base="tiny-text", methods=["prototype"], shots=[0, 2], seeds=1,
                       log=lines.append)
    assert [r["shots"] for r in result["runs"]] == [2] and any("prototype needs examples" in x for x in lines)


# ---- the command ------------------------------------------------------------------------------

def headstart_cmd(*args):
    return run_cmd([str(BIN / "headstart"), *map(str, args)], timeout=180)


def test_cli_json_last_line(tiny_text_csv, tmp_path):
    r = headstart_cmd("shots", tiny_text_csv, "--base", "tiny-text", "--methods", "zeroshot,probe", "--shots", "2,4",
                      "--seeds", "2", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr.strip().splitlines()[-5:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(last) == {"results"}
    assert [(x["method"], x["shots"], x["seeds"]) for x in last["results"]] == [("zeroshot", 0, 1), ("probe", 2, 2),
                                                                                ("probe", 4, 2)]
    for row in last["results"]:
        assert set(row) == RESULT_KEYS and 0 <= row["mean"] <= 1 and row["std"] >= 0
    assert "± " in r.stderr  # the table goes to stderr with --json
    assert json.loads((tmp_path / "shots.json").read_text())["results"] == last["results"]


def test_cli_bad_list_is_one_line_error(tiny_text_csv):
    r = headstart_cmd("shots", tiny_text_csv, "--base", "tiny-text", "--methods", "probe", "--shots", "2,x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("headstart: error: --shots '2,x'") and len(lines) == 1


@pytest.mark.parametrize("flag,value", [("--seeds", "two"), ("--shots", "2,,4"), ("--methods", "probe,")])
def test_cli_bad_lists_in_process(tiny_text_csv, capsys, flag, value):
    from headstart.cli import main

    assert main(["shots", str(tiny_text_csv), "--base", "tiny-text", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"headstart: error: {flag} {value!r}")
