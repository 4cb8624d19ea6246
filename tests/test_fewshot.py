"""Few-shot and zero-shot methods: their maths on hand-made inputs, label texts, `auto`'s choice,
and (marker `real`) zero-shot on the real minilm-l6 base."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import headstart
from headstart.core.errors import ConfigError, DataError
from headstart.methods.auto import choose_method
from headstart.methods.labels import fill_templates, label_phrases, parse_label_text
from headstart.methods.prototype.method import class_means
from headstart.engine.batches import balanced_batches
from headstart.methods.setfit.method import pair_loss

from conftest import BIN, run_cmd

QUIET = {"progress": False, "log": lambda s: None}


# ---- label texts --------------------------------------------------------------------------------

def test_label_text_entries_files_and_errors(tmp_path):
    classes = ["HUM", "NUM", "very_negative"]
    assert parse_label_text(["NUM=a number = a quantity"], classes) == {"NUM": "a number = a quantity"}
    (tmp_path / "l.yaml").write_text("HUM: a person\nNUM: a number\n")
    (tmp_path / "l.json").write_text(json.dumps({"HUM": "someone"}))
    assert parse_label_text([str(tmp_path / "l.yaml")], classes) == {"HUM": "a person", "NUM": "a number"}
    assert parse_label_text([str(tmp_path / "l.json"), "NUM=n"], classes) == {"HUM": "someone", "NUM": "n"}
    with pytest.raises(ConfigError, match="unknown label"):
        parse_label_text(["LOC=a place"], classes)
    with pytest.raises(ConfigError, match="neither"):
        parse_label_text([str(tmp_path / "missing.yaml")], classes)
    (tmp_path / "bad.yaml").write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_label_text([str(tmp_path / "bad.yaml")], classes)
    assert label_phrases(classes, {"NUM": "a number"}) == ["HUM", "a number", "very negative"]
    assert fill_templates("sport", ["about {}.", "topic:"]) == ["about sport.", "topic: sport"]


# ---- prototype ----------------------------------------------------------------------------------

def test_class_means_and_prototype_is_nearest_centroid(tiny_text_csv):
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(class_means(z, torch.tensor([0, 0, 1]), 3),
                               torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="prototype", **QUIET)
    data = headstart.load_dataset(tiny_text_csv)
    base = spec.model.base
    with torch.no_grad():
        train = base(**base.collate(data.split("train").items))
        test = base(**base.collate(data.split("test").items))
    center = train.mean(0)
    zt = F.normalize(train - center, dim=-1)
    y = torch.tensor(data.split("train").labels)
    protos = F.normalize(class_means(zt, y, 3), dim=-1)
    expected = (F.normalize(test - center, dim=-1) @ protos.T).argmax(-1)
    got = spec.predict_proba(data.split("test").items).argmax(-1)
    assert torch.equal(got, expected)


# ---- zeroshot -------------------------------------------------------------------------------------

def test_zeroshot_similarity_is_cosine_to_label_embeddings(tiny_text_csv):
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="zeroshot", shots=0,
                         label_text={"food": "something to eat"}, templates=["a text about {}", "{}"], **QUIET)
    assert spec.manifest["data"]["train_examples"] == 0
    assert spec.manifest["method"]["config"]["scoring"] == "similarity"
    assert spec.manifest["method"]["config"]["label_text"] == ["food=something to eat"]
    base = spec.model.base
    labels = []
    for phrase in ("something to eat", "sport", "tech"):
        e = F.normalize(base.encode_text([f"a text about {phrase}", phrase]), dim=-1).mean(0)
        labels.append(F.normalize(e, dim=-1))
    texts = ["pizza and soup", "the coach and the team"]
    with torch.no_grad():
        x = F.normalize(base(**base.collate(texts)), dim=-1)
    expected = (20.0 * x @ torch.stack(labels).T).softmax(-1)
    torch.testing.assert_close(spec.predict_proba(texts), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("base,method,scoring", [("tiny-text", "zeroshot", "similarity"),
                                                 ("tiny-llm", "zeroshot", "likelihood"),
                                                 ("tiny-llm", "incontext", None)])
def test_fit_leaves_the_method_config_unchanged_and_returns_the_one_it_used(tiny_text_csv, tmp_path, base,
                                                                             method, scoring):
    from headstart.core.config import Config
    from headstart.data import load_dataset
    from headstart.methods.base import FitContext
    from headstart.methods.registry import make_method

    data = load_dataset(tiny_text_csv).with_shots(0 if method == "zeroshot" else 1, seed=0)
    m = make_method(method, label_text=["food=something to eat"],
                    **({"examples_per_class": 1} if method == "incontext" else {}))
    given = m.config.to_json()
    result = m.fit(headstart.load_base(base), data, FitContext(progress=False, log=lambda s: None))
    assert m.config.to_json() == given  # not reassigned, not changed in place
    assert isinstance(result.config, Config)
    assert result.config.label_text == ["food=something to eat"]
    if scoring:
        assert given["scoring"] == "auto" and result.config.scoring == scoring
        assert result.method is not m and result.method.config == result.config  # the bundle's method
        state = result.method.trained_state(result.model)
        assert sorted(state) == (["calibration"] if scoring == "likelihood" else ["center", "head.bias", "head.weight"])
        result.method.save_artifacts(result.model, tmp_path, base)
        assert (tmp_path / "prompt.json").is_file() == (scoring == "likelihood")
        restored = m.restore(headstart.load_base(base), 3, state, tmp_path)  # `auto` resolved by the base kind
        texts = ["pizza and soup", "the coach and the team"]
        with torch.no_grad():
            torch.testing.assert_close(restored(**restored.collate(texts)), result.model(**result.model.collate(texts)))


def test_zeroshot_names_coded_labels_and_asks_for_descriptions(tmp_path):
    from conftest import write_table

    rows = [(f"question {i}", label) for i, label in enumerate(["ABBR", "HUM", "LOC"] * 4)]
    write_table(tmp_path / "train.csv", rows)
    write_table(tmp_path / "test.csv", rows)
    said: list[str] = []
    headstart.fit(tmp_path, base="tiny-text", method="zeroshot", shots=0, label_text={"HUM": "a person"},
                  progress=False, log=said.append)
    hint = [m for m in said if m.startswith("zero-shot: label(s)")]
    assert len(hint) == 1 and "ABBR, LOC" in hint[0] and "--label-text \"ABBR=" in hint[0]


def test_jargon_labels_on_a_causal_lm_are_told_to_use_an_answer_word(tmp_path):
    from conftest import write_table

    rows = [(f"message {i}", label) for i, label in enumerate(["ham", "spam"] * 4)]
    write_table(tmp_path / "train.csv", rows)
    write_table(tmp_path / "test.csv", rows)
    said: list[str] = []
    headstart.fit(tmp_path, base="tiny-llm", method="zeroshot", shots=0, progress=False, log=said.append)
    hint = [m for m in said if m.startswith("zero-shot: label(s)")]
    assert len(hint) == 1 and "ham" in hint[0] and "--answer-word \"ham=" in hint[0]
    said.clear()  # with an answer word for it, `ham` is no longer flagged, and the LM answers `normal`
    spec = headstart.fit(tmp_path, base="tiny-llm", method="zeroshot", shots=0, answer_word={"ham": "normal"},
                         progress=False, log=said.append)
    assert not [m for m in said if m.startswith("zero-shot: label(s)")]
    assert spec.model.spec.answers == ["normal", "spam"] and spec.model.spec.classes == ["ham", "spam"]
    assert spec.manifest["method"]["config"]["answer_word"] == ["ham=normal"]
    assert set(spec.predict(["hello", "win a prize"])) <= {"ham", "spam"}


def test_answer_words_are_checked_like_label_text():
    from headstart.methods.labels import parse_answer_words

    with pytest.raises(ConfigError, match="answer word for unknown label"):
        parse_answer_words(["eggs=normal"], ["ham", "spam"])
    with pytest.raises(ConfigError, match="answer word 'missing.yaml' is neither"):
        parse_answer_words(["missing.yaml"], ["ham", "spam"])
    with pytest.raises(ConfigError, match="answers must be distinct"):
        from headstart.methods.lm_scoring import default_prompt_spec

        default_prompt_spec(["ham", "spam"], {}, [], None, True, answer_words={"ham": "spam"})


def test_lm_answers_lower_case_codes_unless_two_would_collide():
    from headstart.methods.lm_scoring import default_prompt_spec

    assert default_prompt_spec(["ABBR", "HUM"], {}, [], None, True).label_lines == ["abbr", "hum"]
    assert default_prompt_spec(["NUM", "num"], {}, [], None, True).label_lines == ["NUM", "num"]


def test_zeroshot_on_an_image_base_without_text_tower_is_a_clear_error(tiny_image_folder):
    with pytest.raises(ConfigError, match="text tower"):
        headstart.fit(tiny_image_folder, base="tiny-image", method="zeroshot", shots=0, **QUIET)


def test_zeroshot_likelihood_needs_a_causal_lm(tiny_text_csv):
    with pytest.raises(ConfigError, match="causal LM"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="zeroshot", scoring="likelihood", **QUIET)


def test_methods_needing_examples_refuse_zero_shots(tiny_text_csv):
    with pytest.raises(DataError, match="zeroshot"):
        headstart.fit(tiny_text_csv, base="tiny-text", method="probe", shots=0, **QUIET)


def test_cli_label_text_flag_repeats(tiny_text_csv, tmp_path):
    out = tmp_path / "zs"
    r = run_cmd([str(BIN / "headstart"), "fit", str(tiny_text_csv), "--base", "tiny-text", "--method", "zeroshot",
                 "--shots", "0", "--label-text", "food=a meal", "--label-text", "tech=computers", "--out", str(out),
                 "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] >= 0
    config = json.loads((out / "manifest.json").read_text())["method"]["config"]
    assert config["label_text"] == ["food=a meal", "tech=computers"]


# ---- setfit ---------------------------------------------------------------------------------------

def test_pair_loss_matches_the_pairwise_definition():
    torch.manual_seed(0)
    emb, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 0])
    z = F.normalize(emb, dim=-1)
    pos, neg = [], []
    for i in range(6):
        for j in range(i + 1, 6):
            c = float(z[i] @ z[j])
            (pos if y[i] == y[j] else neg).append((c - 1) ** 2 if y[i] == y[j] else c ** 2)
    expected = 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))
    assert pair_loss(emb, y).item() == pytest.approx(expected, rel=1e-5)
    # all one class: only positive pairs count
    assert pair_loss(emb, torch.zeros(6, dtype=torch.long)).item() == pytest.approx(
        sum((float(z[i] @ z[j]) - 1) ** 2 for i in range(6) for j in range(i + 1, 6)) / 15, rel=1e-5)


def test_balanced_batches_draw_every_class_and_cycle_through_examples():
    labels = [0] * 10 + [1] * 3 + [2] * 6
    batches = balanced_batches(labels, batch_size=6, steps=5, seed=0)
    assert len(batches) == 5
    for b in batches:
        assert {labels[i] for i in b} == {0, 1, 2} and len(b) == len(set(b))
    seen0 = [i for b in batches for i in b if labels[i] == 0]
    assert set(seen0) == set(range(10)), "each class's examples are cycled through before repeating"
    assert batches == balanced_batches(labels, batch_size=6, steps=5, seed=0)
    assert batches != balanced_batches(labels, batch_size=6, steps=5, seed=1)


def test_setfit_body_moves_and_lora_variant_stores_only_the_adapter(tiny_text_csv, tmp_path):
    pristine = headstart.load_base("tiny-text")
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="setfit", epochs=3, **QUIET)
    moved = [n for n, p in spec.model.backbone.named_parameters()
             if not torch.equal(p, dict(pristine.named_parameters())[n])]
    assert moved, "the contrastive phase changed no body weight"
    assert spec.manifest["details"]["body_steps"] >= 1
    assert all("loss" in h for h in spec.manifest["history"])
    out = tmp_path / "sf-lora"
    lora = headstart.fit(tiny_text_csv, base="tiny-text", method="setfit", epochs=3, lora=True, r=2, out=out, **QUIET)
    from safetensors.torch import load_file

    assert set(load_file(out / "trained.safetensors")) == {"head.weight", "head.bias", "center"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    texts = ["pizza soup", "goal match"]
    torch.testing.assert_close(headstart.load(out).predict_proba(texts), lora.predict_proba(texts), atol=1e-5, rtol=0)


# ---- auto -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,kind,expected", [(0, "text", "zeroshot"), (8, "text", "setfit"), (500, "text", "lora"),
                                             (1, "image", "prototype"), (4, "image", "prototype"), (8, "image", "probe"),
                                             (0, "image", "zeroshot"), (4, "causal_lm", "probe")])
def test_auto_rules(n, kind, expected):
    name, why = choose_method(n, kind)
    assert name == expected and str(n) in why and kind in why


def test_auto_without_slow_methods_stays_frozen():
    assert choose_method(8, "text", allow_slow=False)[0] == "probe"


def test_auto_reports_its_choice(tiny_text_csv, tmp_path):
    lines: list[str] = []
    spec = headstart.fit(tiny_text_csv, base="tiny-text", method="auto", shots=2, out=tmp_path / "a",
                         progress=False, log=lines.append)
    assert spec.manifest["method"]["name"] == "setfit"
    assert any(line.startswith("auto: 2 examples per class") for line in lines)
    assert "chosen by `auto`" in (tmp_path / "a" / "README.md").read_text()
    assert headstart.load(tmp_path / "a").method.name == "setfit"


# ---- real base ------------------------------------------------------------------------------------

@pytest.mark.real
def test_real_minilm_zeroshot_descriptions_beat_cryptic_names(data_root):
    """TREC's labels are codes (ABBR, ENTY, ...): describing them must help the encoder (first 150 test rows)."""
    from dataclasses import replace

    data = headstart.load_dataset(data_root / "trec")
    data = replace(data, splits={**data.splits, "test": data.split("test").subset(list(range(150)))})
    names = headstart.fit(data, base="minilm-l6", method="zeroshot", shots=0, **QUIET)
    desc = headstart.fit(data, base="minilm-l6", method="zeroshot", shots=0,
                         label_text={"ABBR": "an abbreviation", "DESC": "a description or definition",
                                        "ENTY": "an entity or thing", "HUM": "a person",
                                        "LOC": "a location or place", "NUM": "a number or date"}, **QUIET)
    assert desc.manifest["metrics"]["accuracy"] > names.manifest["metrics"]["accuracy"] + 0.1
    assert desc.manifest["metrics"]["accuracy"] > 0.3  # six classes: chance is ~0.17


def test_a_finished_fit_without_a_bundle_leaves_no_checkpoint(tiny_text_csv, tmp_path, monkeypatch):
    """The harness fits hundreds of times without --out: spent resume checkpoints must not pile up."""
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "cache"))
    headstart.fit(tiny_text_csv, base="tiny-text", method="finetune", epochs=1, **QUIET)
    leftovers = list((tmp_path / "cache" / "checkpoints").glob("*")) if (tmp_path / "cache" / "checkpoints").exists() else []
    assert leftovers == []
