"""The task registry and the one `fit` over it: listing, defaults, the inputs each task reads, `init=`,
qlora as a method of sft and dpo, the shared classify prelude, and a cheap `api` import."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import headstart
from headstart.core.errors import ConfigError, UnknownMethodError
from headstart.methods.registry import list_methods, make_method
from headstart.tasks import get_task, list_tasks

QUIET = {"progress": False, "log": lambda s: None}
FAST = {"epochs": 2, "batch_size": 4, "lr": 5e-3, "max_length": 96, "side_by_side": 0, "bf16": "false"}
CLASSIFY_METHODS = {"adabn", "auto", "coral", "dann", "finetune", "incontext", "lora", "probe", "prototype",
                    "scratch", "selftrain", "setfit", "source-only", "target-oracle", "zeroshot"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-data")
    qa = [("colour of the sky", "blue"), ("colour of grass", "green"), ("colour of snow", "white"),
          ("colour of coal", "black")]
    sft = write_jsonl(root / "sft.jsonl", [{"instruction": f"What is the {q}?", "output": a} for q, a in qa * 4])
    prefs = write_jsonl(root / "prefs.jsonl", [{"prompt": f"What is the {q}?", "chosen": a, "rejected": "purple"}
                                               for q, a in qa * 3])
    return {"root": root, "sft": sft, "prefs": prefs}


@pytest.fixture(scope="module")
def sft_bundle(lm_files):
    out = lm_files["root"] / "sft-bundle"
    headstart.fit(lm_files["sft"], base="tiny-llm", task="sft", out=out, **QUIET, **FAST)  # method: sft's default
    return out


def test_registry_lists_the_tasks_and_their_methods():
    assert [t.name for t in list_tasks()] == ["classify", "sft", "dpo"]
    assert {s.name for s in list_methods()} == CLASSIFY_METHODS  # classify keeps every method it had
    assert {s.name for s in list_methods("classify")} == CLASSIFY_METHODS
    for task in ("sft", "dpo"):
        assert [s.name for s in list_methods(task)] == ["lora", "qlora"]
    for task in list_tasks():  # the default method is the task's, and registered for it
        assert task.default_method in {s.name for s in list_methods(task.name)}, task.name
    assert get_task("classify").default_method == "probe" and get_task("sft").default_method == "lora"


def test_methods_are_keyed_by_task():
    assert type(make_method("lora")).__name__ == "Lora"  # classify's lora adapts an encoder under a head
    sft_qlora = make_method("qlora", task="sft", epochs=2)
    assert sft_qlora.quantize == "nf4" and sft_qlora.config.epochs == 2 and make_method("lora", "sft").quantize is None
    assert make_method("qlora", task="dpo").quantize == "nf4"
    with pytest.raises(ConfigError, match="lora, qlora"):  # a method of another task names this task's methods
        make_method("probe", task="sft")
    with pytest.raises(UnknownMethodError, match="nope"):
        make_method("nope", task="dpo")
    with pytest.raises(ConfigError, match="no option"):
        make_method("probe", epochs=3)


def test_unknown_task_is_a_clear_error(tiny_text_csv):
    with pytest.raises(ConfigError, match="unknown task 'nope'; tasks: classify, sft, dpo"):
        headstart.fit(tiny_text_csv, base="tiny-text", task="nope", **QUIET)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("regress")


def test_inputs_a_task_does_not_read_are_refused(tiny_text_csv, lm_files):
    with pytest.raises(ConfigError, match="eval= does not apply to task 'classify'"):
        headstart.fit(tiny_text_csv, base="tiny-text", eval=tiny_text_csv, **QUIET)
    with pytest.raises(ConfigError, match="shots= does not apply to task 'sft'"):
        headstart.fit(lm_files["sft"], base="tiny-llm", task="sft", shots=4, **QUIET)
    with pytest.raises(ConfigError, match="cannot start from a bundle"):
        headstart.fit(tiny_text_csv, base="tiny-text", init=lm_files["root"], **QUIET)


def test_sft_default_method_and_init_dpo_from_the_sft_bundle(sft_bundle, lm_files, tmp_path):
    sft = json.loads((sft_bundle / "manifest.json").read_text())
    assert sft["task"] == "sft" and sft["method"]["name"] == "lora" and "parent" not in sft
    spec = headstart.fit(lm_files["prefs"], task="dpo", init=sft_bundle, out=tmp_path / "dpo", **QUIET,
                         **{**FAST, "batch_size": 2})
    m = spec.manifest
    assert m["parent"]["bundle"] == str(sft_bundle) and m["parent"]["task"] == "sft"
    assert m["parent"]["method"] == "lora" and m["parent"]["created"] == sft["created"]
    assert m["method"]["name"] == "lora" and m["base"] == sft["base"]  # the method and base of the parent
    assert m["metrics"]["eval_dpo_loss"] < m["metrics"]["eval_dpo_loss_before"]
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text())["parent"] == m["parent"]
    with pytest.raises(ConfigError, match="trained with 'lora'"):  # the adapter only fits its own (fp32) base
        headstart.fit(lm_files["prefs"], task="dpo", init=sft_bundle, method="qlora", **QUIET, **FAST)
    with pytest.raises(ConfigError, match="cannot continue on"):
        headstart.fit(lm_files["prefs"], task="dpo", init=sft_bundle, base="smollm2-135m", **QUIET, **FAST)


def test_sft_continues_an_sft_bundle(sft_bundle, lm_files):
    before = json.loads((sft_bundle / "manifest.json").read_text())["metrics"]["eval_loss"]
    spec = headstart.fit(lm_files["sft"], task="sft", init=sft_bundle, **QUIET, **FAST)
    m = spec.manifest
    assert m["parent"]["bundle"] == str(sft_bundle) and m["method"]["name"] == "lora"
    assert m["metrics"]["eval_loss_before"] == pytest.approx(before, rel=1e-4)  # starts where the parent ended


def test_qlora_is_a_method_of_dpo(lm_files, tmp_path):
    spec = headstart.fit(lm_files["prefs"], base="tiny-llm", task="dpo", method="qlora", out=tmp_path / "q",
                         **QUIET, **{**FAST, "batch_size": 2})
    assert spec.manifest["method"]["name"] == "qlora" and "parent" not in spec.manifest
    loaded = headstart.load(tmp_path / "q")
    layer = loaded.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit"


def test_image_size_on_a_text_base_is_a_config_error(tiny_text_csv):
    from headstart.data import load_dataset
    from headstart.tasks.classify import prepare_base

    with pytest.raises(ConfigError, match="no image size"):
        prepare_base("tiny-text", load_dataset(tiny_text_csv), image_size=64)
    with pytest.raises(ConfigError, match="no image size"):  # `adapt` shares fit's prelude (it raised a raw ValueError)
        headstart.adapt(tiny_text_csv, tiny_text_csv, base="tiny-text", method="coral", image_size=64, **QUIET)


def test_api_module_imports_nothing_heavy():
    """`headstart --help` reads fit's signature: importing api.py must not pull torch or model code."""
    tree = ast.parse((Path(headstart.__file__).parent / "api.py").read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in top if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in top if isinstance(node, ast.ImportFrom)}
    assert names <= {"__future__", "hashlib", "json", "shutil", "time", "pathlib", "typing"}, names


def test_cli_unknown_task_is_one_line(tiny_text_csv):
    from conftest import assert_clean_error, headstart_cli

    assert_clean_error(headstart_cli("fit", tiny_text_csv, "--base", "tiny-text", "--task", "nope"), "unknown task")
