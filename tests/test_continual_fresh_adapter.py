"""A fresh LoRA adapter per night (continual/fresh_adapter.py): trains alone, folds exactly into "default"."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import headstart
from headstart.bundle.adapters import check_adapter_folder
from headstart.continual.fresh_adapter import (FRESH, OLD, adapter_trains, add_fresh_adapter, fold_fresh_adapter,
                                               has_fresh_adapter)
from headstart.core.errors import TrainingError

from bundle_fixtures import INPUTS, lora_bundle  # noqa: F401  (fixtures are found by name)

RANK, ALPHA = 4, 8.0


def _tiny_lora(base: str = "tiny-text", seed: int = 0):
    """A tiny base under a LoRA adapter whose B is non-zero (as after a first fit), as methods/lora builds it."""
    from peft import get_peft_model

    from headstart.bases import load_base
    from headstart.methods.lora.config import LoraMethodConfig
    from headstart.methods.lora.method import Lora, _match_memory_format

    torch.manual_seed(seed)
    backbone = load_base(base)
    backbone.name_or_path = backbone.info.name
    model = get_peft_model(backbone, Lora(LoraMethodConfig(r=RANK, alpha=ALPHA)).peft_config(backbone))
    _match_memory_format(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    inputs = INPUTS if base == "tiny-text" else [Image.new("RGB", (40, 32), c) for c in ("red", "green", "navy")]
    return model.eval(), backbone.collate(inputs)


def _outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).float()


def _deltas(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's summed delta W over the active adapters (what a merge would add to the base)."""
    from peft.tuners.lora import LoraLayer

    return {name: sum(module.get_delta_weight(a) for a in module.active_adapters).detach().clone()
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _train_fresh(model, batch, steps: int = 3) -> None:
    """A few optimizer steps on a random target: the fresh adapter moves away from its zero-B start."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn_like(_outputs(model, batch))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(**batch), target).backward()
        opt.step()
    model.eval()


def test_only_the_fresh_adapter_receives_gradients():
    model, batch = _tiny_lora()
    assert add_fresh_adapter(model, rank=RANK, alpha=ALPHA) == FRESH and has_fresh_adapter(model)
    assert model.active_adapters == [OLD, FRESH]
    model(**batch).pow(2).mean().backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    fresh = {n for n in lora if f".{FRESH}." in n}
    assert fresh and len(fresh) * 2 == len(lora)
    for name, p in model.named_parameters():
        trains = name in fresh
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name
        if "lora_" in name:
            assert adapter_trains(model, name) == trains
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if n in fresh)


def test_the_fresh_adapter_starts_as_a_no_op():
    model, batch = _tiny_lora()
    before = _outputs(model, batch)
    add_fresh_adapter(model, rank=RANK, alpha=ALPHA)
    assert torch.equal(_outputs(model, batch), before)  # PEFT's init: B = 0


@pytest.mark.parametrize("base", ["tiny-text", "tiny-image"])
def test_the_fold_equals_both_adapters_after_training(base):
    model, batch = _tiny_lora(base)
    old_deltas = _deltas(model)
    add_fresh_adapter(model, rank=RANK, alpha=ALPHA)
    _train_fresh(model, batch)
    both = _outputs(model, batch)
    both_deltas = _deltas(model)
    assert max((both_deltas[k] - old_deltas[k]).abs().max() for k in old_deltas) > 1e-4  # it did learn
    facts = fold_fresh_adapter(model)
    assert facts == {"rank_before": RANK, "rank_after": 2 * RANK, "fresh_rank": RANK}
    assert list(model.peft_config) == [OLD] and model.active_adapter == OLD and not has_fresh_adapter(model)
    assert not any(f".{FRESH}." in n or ".folded." in n for n, _ in model.named_parameters())
    folded = _deltas(model)
    assert folded.keys() == both_deltas.keys()
    for key in folded:
        torch.testing.assert_close(folded[key], both_deltas[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(_outputs(model, batch), both, atol=1e-5, rtol=0)


def test_the_folded_adapter_round_trips_through_peft_and_bundle_vetting(tmp_path):
    from peft import PeftModel

    from headstart.bases import load_base

    model, batch = _tiny_lora()
    add_fresh_adapter(model, rank=RANK, alpha=ALPHA)
    _train_fresh(model, batch)
    fold_fresh_adapter(model)
    expected = _outputs(model, batch)
    model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.name != "README.md") == [
        "adapter_config.json", "adapter_model.safetensors"]  # no per-adapter subfolders left behind
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK and config["lora_alpha"] == 2 * RANK
    check_adapter_folder(tmp_path / "adapter")  # the grown rank passes the bundle layer's vetting
    backbone = load_base("tiny-text")
    backbone.name_or_path = backbone.info.name
    restored = PeftModel.from_pretrained(backbone, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_outputs(restored, batch), expected, atol=1e-6, rtol=0)


def test_each_night_adds_the_method_rank_not_the_grown_one():
    model, batch = _tiny_lora()
    for night in (1, 2):
        add_fresh_adapter(model, rank=RANK, alpha=ALPHA)
        assert model.peft_config[FRESH].r == RANK and model.peft_config[FRESH].lora_alpha == ALPHA
        _train_fresh(model, batch, steps=1)
        both = _outputs(model, batch)
        assert fold_fresh_adapter(model)["rank_after"] == (night + 1) * RANK
        torch.testing.assert_close(_outputs(model, batch), both, atol=1e-5, rtol=0)


def test_misuse_is_a_one_line_training_error():
    model, _ = _tiny_lora()
    with pytest.raises(TrainingError, match="nothing to fold"):
        fold_fresh_adapter(model)
    add_fresh_adapter(model)
    with pytest.raises(TrainingError, match="already present"):
        add_fresh_adapter(model)


def test_a_lora_bundle_saved_after_a_fold_loads_and_predicts_the_same(lora_bundle, tmp_path):  # noqa: F811
    spec = headstart.load(lora_bundle)
    original = spec.predict_proba(INPUTS)
    peft_model = spec.model.backbone
    rank = peft_model.peft_config[OLD].r
    add_fresh_adapter(peft_model, rank=rank, alpha=peft_model.peft_config[OLD].lora_alpha)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if f"lora_B.{FRESH}." in name:
                p.normal_(0.0, 0.05)  # stands in for a night's training
    fold_fresh_adapter(peft_model)
    spec.model.eval()
    expected = spec.predict_proba(INPUTS)
    assert (expected - original).abs().max() > 1e-4  # the fresh adapter did change the specialist
    spec.save(tmp_path / "v2")
    again = headstart.load(tmp_path / "v2")
    assert again.model.backbone.peft_config[OLD].r == 2 * rank
    torch.testing.assert_close(again.predict_proba(INPUTS), expected, atol=1e-5, rtol=0)
