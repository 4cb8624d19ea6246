"""The artifact layer: manifest v2 (and v1 still loading), shared bases, several heads, prediction that
never writes the cache, commands on every bundle kind, the model card's metadata, hardened loading."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import headstart
from headstart.bundle import commands
from headstart.bundle.format import FORMAT_VERSION
from headstart.core.errors import BundleError, HeadstartError

from conftest import text_rows, write_table

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


# ---- manifest v2 and v1 ---------------------------------------------------------------------

def test_v2_manifest_names_kind_heads_and_adapters(probe_bundle, lora_bundle, sft_bundle):
    probe, lora, sft = (json.loads((b / "manifest.json").read_text()) for b in (probe_bundle, lora_bundle, sft_bundle))
    assert probe["format_version"] == lora["format_version"] == FORMAT_VERSION == 2
    assert probe["kind"] == "classifier" and probe["heads"] == {"default": {"classes": ["food", "sport", "tech"]}}
    assert "adapters" not in probe and lora["adapters"] == {"default": "adapter"}
    assert sft["kind"] == "generator" and sft["adapters"] == {"default": "adapter"}
    assert not (sft_bundle / "trained.safetensors").exists(), "an LM bundle needs no empty trained.safetensors"
    assert sft["files"] == {}


@pytest.mark.parametrize("which", ["probe_bundle", "lora_bundle", "sft_bundle"])
def test_v1_bundles_still_load(which, request, copy_of):
    bundle = request.getfixturevalue(which)
    folder = copy_of(bundle)
    as_v1(folder)
    old, new = headstart.load(folder), headstart.load(bundle)
    assert old.manifest["kind"] == new.manifest["kind"]
    if which == "sft_bundle":
        batch = new.tokenizer(["What is the colour of snow?"], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(old.model(**batch).logits, new.model(**batch).logits)
    else:
        assert old.classes == new.classes
        torch.testing.assert_close(old.predict_proba(INPUTS), new.predict_proba(INPUTS))
    assert commands.info(folder)["format_version"] == 1


# ---- sharing one loaded base ------------------------------------------------------------------

def test_two_bundles_share_one_loaded_base(probe_bundle, tiny_text_csv, tmp_path):
    # A second specialist on the same base, with other labels: sport vs not-sport.
    two = tmp_path / "two"
    write_table(two / "train.csv", [(t, "sport" if y == "sport" else "other") for t, y in text_rows(60, seed=3)])
    headstart.fit(two / "train.csv", base="tiny-text", method="probe", out=tmp_path / "b", **QUIET)
    alone_a, alone_b = headstart.load(probe_bundle), headstart.load(tmp_path / "b")

    base = headstart.load_base("tiny-text")
    a, b = headstart.load(probe_bundle, base=base), headstart.load(tmp_path / "b", base=base)
    assert a.model.base is base and b.model.base is base
    shared = {p.data_ptr() for p in base.parameters()}
    for spec in (a, b):
        assert {p.data_ptr() for p in spec.model.base.parameters()} == shared
    assert a.classes == ["food", "sport", "tech"] and b.classes == ["other", "sport"]
    torch.testing.assert_close(a.predict_proba(INPUTS), alone_a.predict_proba(INPUTS))
    torch.testing.assert_close(b.predict_proba(INPUTS), alone_b.predict_proba(INPUTS))
    assert a.predict(["goal team match"]) == ["sport"] and b.predict(["goal team match"]) == ["sport"]


def test_a_bundle_that_changes_its_base_refuses_to_share_it(lora_bundle):
    with pytest.raises(BundleError) as e:
        headstart.load(lora_bundle, base=headstart.load_base("tiny-text"))
    assert "cannot share" in one_line(e)


def test_two_generators_share_one_loaded_base(sft_bundle, sft_files, copy_of):
    other = copy_of(sft_bundle)
    weights = other / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 3 for k, v in load_file(weights).items()}, weights)  # a different adapter
    alone = [headstart.load(b) for b in (sft_bundle, other)]
    base = headstart.load_base("tiny-llm")
    shared = [headstart.load(b, base=base) for b in (sft_bundle, other)]
    assert shared[0].model.get_base_model() is shared[1].model.get_base_model() is base.lm
    prompt = "What is the colour of coal?"
    answers = [s.generate(prompt, temperature=0.0, max_new_tokens=5) for s in alone]
    assert [s.generate(prompt, temperature=0.0, max_new_tokens=5) for s in shared] == answers
    assert [s.generate(prompt, temperature=0.0, max_new_tokens=5) for s in reversed(shared)] == answers[::-1]
    losses = [s.evaluate(sft_files["test"])["loss"] for s in alone]
    assert abs(losses[0] - losses[1]) > 1e-3, "the two adapters must differ for this test to mean anything"
    for spec, loss in [*zip(shared, losses), *zip(reversed(shared), reversed(losses))]:
        assert spec.evaluate(sft_files["test"])["loss"] == pytest.approx(loss, rel=1e-5)


# ---- several heads ------------------------------------------------------------------------------

def test_a_bundle_with_two_heads_loads_either(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    stored = load_file(folder / "trained.safetensors")
    (folder / "heads").mkdir()
    # The second head: only "sport" vs "food" rows of the default head.
    save_file({"head.weight": stored["head.weight"][[1, 0]].contiguous(), "head.bias": stored["head.bias"][[1, 0]]},
              folder / "heads" / "sport.safetensors")
    edit_manifest(folder, lambda m: m["heads"].update(sport={"classes": ["sport", "food"],
                                                               "weights": "heads/sport.safetensors"}))
    default, sport = headstart.load(folder), headstart.load(folder, head="sport")
    assert default.classes == ["food", "sport", "tech"] and sport.classes == ["sport", "food"]
    assert sport.heads == ["default", "sport"]
    assert sport.predict(["goal team match", "pizza soup bread"]) == ["sport", "food"]
    with pytest.raises(BundleError) as e:
        headstart.load(folder, head="nope")
    assert "no head 'nope'" in one_line(e)


# ---- prediction leaves the cache alone ----------------------------------------------------------

def test_predicting_100_times_leaves_the_cache_unchanged(probe_bundle, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    spec = headstart.load(probe_bundle)
    spec.predict(INPUTS[:2])  # whatever loading itself caches (hashes), before the snapshot
    before = snapshot(cache)
    expected = spec.predict_proba(INPUTS)
    for i in range(100):
        torch.testing.assert_close(spec.predict_proba(INPUTS + [f"new text number {i}"])[:4], expected)
    assert snapshot(cache) == before


def test_prediction_reads_features_the_fit_cached(tiny_text_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="probe", **QUIET)
    train_texts = [t for t, _ in text_rows(60, seed=0)][:5]  # the rows of train.csv
    import headstart.engine.features as features

    calls = []
    real = features.encode
    monkeypatch.setattr(features, "encode",
                        lambda b, items, *a, **k: calls.append(len(items)) or real(b, items, *a, **k))
    spec.predict(train_texts)
    assert calls == [0], "every row was in the cache: nothing is encoded"


# ---- commands on every kind ---------------------------------------------------------------------

@pytest.mark.parametrize("which", ["probe_bundle", "lora_bundle", "sft_bundle", "dpo_bundle"])
def test_info_predict_evaluate_on_every_kind(which, request, tiny_text_csv, sft_files):
    bundle = request.getfixturevalue(which)
    i = commands.info(bundle)
    assert i["base"]["sha256"] and i["method"]["name"] in ("probe", "lora") and "manifest.json" in i["files"]
    assert "bundle" in commands.describe(bundle)
    generator = which in ("sft_bundle", "dpo_bundle")
    assert i["kind"] == ("generator" if generator else "classifier")
    assert i["task"] == {"sft_bundle": "sft", "dpo_bundle": "dpo"}.get(which, "classify")
    rows = commands.predict(bundle, ["What is the colour of snow?"] if generator else INPUTS[:2],
                            top_k=2, max_new_tokens=3)
    if generator:
        assert isinstance(rows[0]["answer"], str)
        m = commands.evaluate(bundle, sft_files["test"])
        assert m["examples"] == 4 and m["perplexity"] > 1
    else:
        assert rows[0]["label"] == "sport" and len(rows[0]["top"]) == 2
        assert 0 <= headstart.evaluate(bundle, tiny_text_csv)["accuracy"] <= 1


def test_export_says_why_not_for_a_classifier(probe_bundle, tmp_path):
    with pytest.raises(BundleError) as e:
        commands.export(probe_bundle, tmp_path / "out")
    assert "classifier" in one_line(e) and not (tmp_path / "out").exists()


def test_export_after_an_unsaved_fit(sft_files, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = headstart.fit(sft_files["train"], base="tiny-llm", method="lora", task="sft", **QUIET, **LLM_FAST)
    assert spec.folder is None
    merged = commands.export(spec, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    batch = spec.tokenizer(["What is the colour of coal?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, spec.model(**batch).logits, atol=1e-4, rtol=0)
    adapter = commands.export(spec, tmp_path / "adapter", merged=False)
    files = sorted(p.name for p in adapter.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


# ---- the model card -----------------------------------------------------------------------------

@pytest.mark.parametrize("which,relation,library,pipeline", [
    ("probe_bundle", "adapter", "headstart", "text-classification"),
    ("lora_bundle", "adapter", "peft", "text-classification"),
    ("sft_bundle", "adapter", "peft", "text-generation"),
])
def test_card_front_matter(which, relation, library, pipeline, request):
    text = (request.getfixturevalue(which) / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "tiny-llm" if which == "sft_bundle" else "tiny-text"
    assert (meta["base_model_relation"], meta["library_name"], meta["pipeline_tag"]) == (relation, library, pipeline)
    results = meta["model-index"][0]["results"][0]
    assert results["task"]["type"] == pipeline
    expected = {"loss", "perplexity"} if which == "sft_bundle" else {"accuracy", "f1"}
    assert {m["type"] for m in results["metrics"]} >= expected
    assert all(isinstance(m["value"], float) for m in results["metrics"])


def test_card_licence_comes_from_the_base(probe_bundle):
    from headstart.bundle.card import front_matter

    m = json.loads((probe_bundle / "manifest.json").read_text())
    m["base"]["license"] = "apache-2.0"
    assert yaml.safe_load(front_matter(m))["license"] == "apache-2.0"
    m["kind"], m["base"]["kind"] = "classifier", "image"
    assert yaml.safe_load(front_matter(m, "finetune"))["base_model_relation"] == "finetune"
    assert yaml.safe_load(front_matter(m))["pipeline_tag"] == "image-classification"


# ---- hardened loading ---------------------------------------------------------------------------

class Boom:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(probe_bundle, copy_of, tmp_path):
    folder = copy_of(probe_bundle)
    marker = tmp_path / "ran"
    (folder / "trained.safetensors").write_bytes(pickle.dumps(Boom(marker), protocol=4))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "trained.safetensors" in one_line(e) and "pickle" in one_line(e)
    assert not marker.exists()


def test_safetensors_starting_like_a_pickle_still_load(probe_bundle, copy_of):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 is a valid one."""
    folder = copy_of(probe_bundle)
    path = folder / "trained.safetensors"
    stored = load_file(path)
    for pad in range(700):
        save_file(stored, path, metadata={"format": "headstart-bundle", "pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":  # pickle protocol 2's opening bytes
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    expected = headstart.load(probe_bundle).predict_proba(INPUTS)
    torch.testing.assert_close(headstart.load(folder).predict_proba(INPUTS), expected)


def test_truncated_weights_name_the_file(probe_bundle, copy_of):
    folder = copy_of(probe_bundle)
    data = (folder / "trained.safetensors").read_bytes()
    (folder / "trained.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "trained.safetensors" in one_line(e) and "damaged" in one_line(e)


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_adapter_weights_load_only_from_safetensors(lora_bundle, copy_of, tmp_path, monkeypatch, name):
    folder = copy_of(lora_bundle)
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"
    (folder / "adapter" / name).write_bytes(pickle.dumps(Boom(marker)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert name in one_line(e) and not marker.exists()


def test_adapter_pickle_under_the_safetensors_name_is_refused(sft_bundle, copy_of, tmp_path):
    folder = copy_of(sft_bundle)
    marker = tmp_path / "ran"
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(pickle.dumps(Boom(marker)))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "pickle" in one_line(e) and not marker.exists()


@pytest.mark.parametrize("change,needle", [
    (lambda m: m.pop("base"), "`base`"),
    (lambda m: m["base"].pop("sha256"), "`base.sha256`"),
    (lambda m: m.update(method="probe"), "`method`"),
    (lambda m: m["method"].update(config=[1]), "`method.config`"),
    (lambda m: m.update(heads={"default": {"classes": "food"}}), "head 'default'"),
    (lambda m: m.update(kind="toaster"), "kind"),
    (lambda m: m.update(format_version="2"), "format_version"),
    (lambda m: m.update(format_version=99), "newer"),
    (lambda m: m.update(adapters={"default": "../../etc"}), "outside the bundle"),
    (lambda m: m["heads"]["default"].update(weights="/etc/passwd"), "outside the bundle"),
    (lambda m: m["method"].update(config={"no_such_option": 1}), "method"),
    (lambda m: m["heads"]["default"].update(classes=["a", "b"]), "do not fit"),
])
def test_bad_manifest_is_one_line_naming_the_problem(probe_bundle, copy_of, change, needle):
    folder = copy_of(probe_bundle)
    edit_manifest(folder, change)
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert needle in one_line(e)


def test_info_on_a_damaged_bundle_is_a_headstart_error(sft_bundle, copy_of):
    folder = copy_of(sft_bundle)
    edit_manifest(folder, lambda m: m.pop("adapters"))
    with pytest.raises(HeadstartError) as e:
        commands.info(folder)
    assert "adapters" in one_line(e)


def test_a_generator_shares_only_a_causal_lm_base(sft_bundle):
    with pytest.raises(BundleError) as e:
        headstart.load(sft_bundle, base=headstart.load_base("tiny-text"))
    assert "causal-LM" in one_line(e)


def test_a_classifier_adapter_folder_named_elsewhere_is_refused(lora_bundle, copy_of):
    folder = copy_of(lora_bundle)
    (folder / "adapter").rename(folder / "lora-a")
    edit_manifest(folder, lambda m: m.update(adapters={"default": "lora-a"}))
    with pytest.raises(BundleError) as e:
        headstart.load(folder)
    assert "lora-a" in one_line(e)


def test_a_generator_adapter_folder_comes_from_the_manifest(sft_bundle, copy_of):
    folder = copy_of(sft_bundle)
    (folder / "adapter").rename(folder / "terse")
    edit_manifest(folder, lambda m: m.update(adapters={"terse": "terse"}))
    spec, reference = headstart.load(folder), headstart.load(sft_bundle)
    batch = reference.tokenizer(["What is the colour of snow?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(spec.model(**batch).logits, reference.model(**batch).logits)
    assert commands.info(folder)["adapters"] == {"terse": "terse"}
