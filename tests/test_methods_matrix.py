"""Every registered method x every base kind, end to end on tiny random bases (no download).

Adding a method = one package, one register call, and one row in MATRIX below:
`test_every_registered_method_has_a_row` fails until the row is there.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import headstart
from headstart.bases.backbone import KINDS
from headstart.data import load_image

# method -> options for a quick fit, and what its bundle's trained.safetensors must hold:
#   "head":        only the new head (the base is referenced by name + hash, never stored)
#   "cosine":      a set (not learnt) cosine head: class vectors + the feature centre
#   "top_block":   the head + the parameters of the top backbone block only (never a lower block)
#   "body":        the head + centre + the whole tuned body (setfit without LoRA)
#   "all":         every weight (random init: there is no base to reference)
#   "calibration": only the per-label calibration of a causal-LM scorer (the prompt is prompt.json)
#   "head_module": only the (non-linear) head: every key under head. (dann's bottleneck + classifier)
#   "bn_stats":    the head + the BatchNorm statistics re-estimated on the target (adabn), no parameter of the base
# "target": the method adapts to target data (the fit gets the same data as an unlabelled target).
# "refuses": what the error says for a base kind the method refuses (default: the causal-LM message).
# "trainable": what fit reports as trainable parameters: "head", "none", "all" (base + head), "some" (between).
# "bases": a base kind the method does not support maps to the base it uses instead (None: it must refuse).
MATRIX: dict[str, dict] = {
    "probe": {"options": {}, "stores": "head", "trainable": "head"},
    "prototype": {"options": {}, "stores": "cosine", "trainable": "none"},
    "zeroshot": {"options": {}, "stores": {"tiny-llm": "calibration"}, "default_stores": "cosine",
                 "trainable": "none", "bases": {"tiny-image": "tiny-clip"}},
    "setfit": {"options": {"epochs": 2}, "stores": "body", "trainable": "all"},
    "incontext": {"options": {"examples_per_class": 1, "instruction": "Topic?"}, "stores": "calibration",
                  "trainable": "none", "bases": {"tiny-image": None, "tiny-text": None}},
    "finetune": {"options": {"epochs": 2, "unfreeze": "1"}, "stores": "top_block", "trainable": "some"},
    "lora": {"options": {"epochs": 2, "r": 4}, "stores": "head", "adapter": True, "trainable": "some"},
    "scratch": {"options": {"epochs": 2}, "stores": "all", "trainable": "all"},
    "adabn": {"options": {}, "stores": "bn_stats", "trainable": "head", "target": True,
              "bases": {"tiny-text": None, "tiny-llm": None}, "refuses": "BatchNorm"},
    "coral": {"options": {}, "stores": "head", "trainable": "head", "target": True},
    "dann": {"options": {"epochs": 2, "bottleneck": 16, "hidden": 16}, "stores": "head_module", "trainable": "some",
             "target": True},
    "selftrain": {"options": {"rounds": 2}, "stores": "head", "trainable": "head", "target": True},
    "source-only": {"options": {}, "stores": "head", "trainable": "head", "target": True},
    "target-oracle": {"options": {}, "stores": "head", "trainable": "head", "target": True},
    # auto delegates: its bundle is the chosen method's (tiny data: 8 images, 20 texts per class)
    "auto": {"options": {}, "chooses": {"tiny-image": "probe", "tiny-text": "setfit", "tiny-llm": "probe"}},
}
BASES = {"tiny-image": "tiny_image_folder", "tiny-text": "tiny_text_csv", "tiny-llm": "tiny_text_csv"}
"""base -> the fixture holding data for it: one base per kind."""
DATA = {**BASES, "tiny-clip": "tiny_image_folder"}


def base_for(method: str, kind_base: str) -> str | None:
    return MATRIX[method].get("bases", {}).get(kind_base, kind_base)


def effective(method: str, base: str) -> str:
    """The method whose bundle a fit produces (`auto` runs another)."""
    return MATRIX[method].get("chooses", {}).get(base, method)


def stores(method: str, base: str) -> str:
    method = effective(method, base)
    rule = MATRIX[method]["stores"]
    return rule.get(base, MATRIX[method].get("default_stores")) if isinstance(rule, dict) else rule


CASES = [(m, base_for(m, b)) for m in MATRIX for b in BASES if base_for(m, b)]
REFUSED = [(m, b) for m in MATRIX for b in BASES if base_for(m, b) is None]
TEXTS = ["pizza with cheese and soup", "the team scored a goal", "my laptop compiler crashed", "x"]
HEX = set("0123456789abcdef")


def test_every_registered_method_has_a_row():
    assert set(MATRIX) == {s.name for s in headstart.list_methods()}


def test_every_base_kind_is_covered():
    assert {headstart.load_base(b).kind for b in BASES} == set(KINDS)


# ---- one fit per (method, base), shared by the tests below ----------------------------------

@pytest.fixture(scope="module")
def fitted(request, tmp_path_factory):
    """fitted(method, base) -> (specialist from fit, bundle folder); each fit runs once."""
    done: dict[tuple[str, str], object] = {}

    def get(method: str, base: str):
        key = (method, base)
        if key not in done:
            data = request.getfixturevalue(DATA[base])
            out = tmp_path_factory.mktemp(f"{method}-{base}") / "bundle"
            try:
                target = {"target": data} if MATRIX[method].get("target") else {}
                spec = headstart.fit(data, base=base, method=method, seed=0, progress=False, out=out,
                                     **target, **MATRIX[method]["options"])
                done[key] = (spec, out)
            except Exception as e:  # fail every test of this case without refitting
                done[key] = e
        if isinstance(done[key], Exception):
            raise done[key]
        return done[key]

    return get


def sample_inputs(base: str, data_folder: Path) -> list:
    if base in ("tiny-image", "tiny-clip"):
        return sorted(str(p) for p in (data_folder / "val").rglob("*.png"))[::5][:4]
    return TEXTS


def param_names(model: torch.nn.Module, module: torch.nn.Module) -> set[str]:
    """Names in `model.state_dict()` of `module`'s parameters and buffers."""
    ids = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {n for n, t in named if id(t) in ids}


@pytest.mark.parametrize("method,base", CASES)
def test_bundle_reloads_to_identical_predictions(fitted, request, method, base):
    spec, out = fitted(method, base)
    xs = sample_inputs(base, request.getfixturevalue(DATA[base]))
    before = spec.predict_proba(xs)
    loaded = headstart.load(out)
    after = loaded.predict_proba(xs)
    assert before.shape == (len(xs), 3)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert torch.allclose(after.sum(-1), torch.ones(len(xs)), atol=1e-5)
    assert loaded.classes == spec.classes
    assert loaded.predict(xs) == spec.predict(xs)
    assert all(label in spec.classes for label in loaded.predict(xs))


@pytest.mark.parametrize("method,base", CASES)
def test_bundle_stores_only_what_was_trained(fitted, method, base):
    spec, out = fitted(method, base)
    stored = load_file(out / "trained.safetensors")
    keys = set(stored)
    head = {"head.weight", "head.bias"}
    model = spec.model
    rule = stores(method, base)
    method = effective(method, base)
    if rule == "calibration":
        assert keys == {"calibration"} and (out / "prompt.json").is_file()
        return
    if rule == "head_module":
        assert keys == {f"head.{k}" for k in model.head.state_dict()} and len(keys) > 2
        return
    assert head <= keys
    if rule == "bn_stats":
        bn = {n for n in keys if n.startswith("backbone.")}
        assert bn and all(n.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for n in bn)
        assert keys == head | bn
    elif rule in ("head", "cosine"):
        assert keys == head | ({"center"} if rule == "cosine" else set())
        assert not any(k.startswith("backbone.") for k in keys), "base weights leaked into the bundle"
    elif rule == "body":
        assert keys - {"center"} - head == {f"backbone.{k}" for k in model.backbone.state_dict()}
    elif rule == "top_block":
        top_name, top = model.base.blocks()[-1]
        allowed = head | param_names(model, top)
        assert keys <= allowed, f"stored beyond head + top block {top_name!r}: {sorted(keys - allowed)[:5]}"
        top_params = {n for n, p in model.named_parameters() if any(p is q for q in top.parameters())}
        assert top_params and top_params <= keys
        lower = [b for _, b in model.base.blocks()[:-1]]
        assert not keys & set().union(*(param_names(model, b) for b in lower))
    else:  # everything: every parameter and every persistent buffer (BatchNorm statistics)
        assert {n for n, _ in model.named_parameters()} <= keys
        missing = set(model.state_dict()) - keys
        assert not missing, f"scratch bundle lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
    own = model.state_dict()
    for k, v in stored.items():  # what is stored is what the model holds
        torch.testing.assert_close(v, own[k].detach().contiguous(), atol=0, rtol=0)


@pytest.mark.parametrize("method,base", CASES)
def test_manifest_and_files(fitted, method, base):
    spec, out = fitted(method, base)
    m = json.loads((out / "manifest.json").read_text())
    backbone = headstart.load_base(base)
    assert m["format"] == "headstart-bundle"
    assert m["base"]["name"] == base
    assert len(m["base"]["sha256"]) == 64 and set(m["base"]["sha256"]) <= HEX
    assert m["base"]["sha256"] == backbone.info.sha256
    assert m["base"]["kind"] == backbone.kind
    assert m["preprocessing"] == json.loads(json.dumps(backbone.info.preprocessing))
    asked = method
    if method == "auto":
        assert m["details"]["auto"]["chose"] == effective(method, base) and m["details"]["auto"]["why"]
    method = effective(method, base)
    assert m["method"]["name"] == method
    for k, v in MATRIX[asked]["options"].items():
        assert m["method"]["config"][k] == v
    assert m["classes"] == spec.classes and len(m["classes"]) == 3
    metrics = m["metrics"]
    for k in ("accuracy", "macro_f1", "trainable_params", "wall_s", "skipped"):
        assert k in metrics, k
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert metrics["wall_s"] > 0
    assert metrics["skipped"] == (1 if DATA[base] == "tiny_image_folder" else 0)  # the corrupt x.jpg
    head_params = 3 * (backbone.feature_dim + 1)
    trainable = MATRIX[method]["trainable"]
    if trainable == "head":
        assert metrics["trainable_params"] == head_params
    elif trainable == "none":
        assert metrics["trainable_params"] == 0
    elif trainable == "all":
        assert metrics["trainable_params"] == backbone.info.params + head_params
    else:
        assert head_params < metrics["trainable_params"] < backbone.info.params
    if method in ("probe", "prototype", "setfit"):
        assert metrics["accuracy"] >= 0.6, f"{method} should learn the tiny task"
    for lib in ("headstart", "torch", "transformers", "peft", "safetensors", "accelerate"):
        assert m["versions"].get(lib), lib

    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    card = (out / "README.md").read_text()
    assert method in card and base in card and "accuracy" in card
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "confusion_matrix.png" in pngs
    if method in ("finetune", "lora", "scratch", "setfit"):
        assert "learning_curves.png" in pngs
    for p in (out / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method,base", REFUSED)
def test_unsupported_base_kind_is_a_clear_error(request, method, base):
    from headstart.core.errors import ConfigError

    data = request.getfixturevalue(BASES[base])
    target = {"target": data} if MATRIX[method].get("target") else {}
    with pytest.raises(ConfigError, match=MATRIX[method].get("refuses", "causal LM")):
        headstart.fit(data, base=base, method=method, progress=False, log=lambda s: None, **target,
                      **MATRIX[method]["options"])


@pytest.mark.parametrize("base", list(BASES))
def test_lora_adapter_is_plain_peft(fitted, request, base):
    from peft import PeftModel

    spec, out = fitted("lora", base)
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names), "the adapter file holds base weights"

    peft_model = PeftModel.from_pretrained(headstart.load_base(base), str(adapter)).eval()
    items = sample_inputs(base, request.getfixturevalue(BASES[base]))
    raw = [load_image(x) for x in items] if base == "tiny-image" else items
    batch = spec.model.base.collate(raw, False)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch), spec.model.backbone(**batch), atol=1e-5, rtol=0)
