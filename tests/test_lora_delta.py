"""combine/lora_delta.py on tiny torch models wrapped by PEFT: exact deltas equal PEFT's own get_delta_weight
(Linear, 1x1 and 3x3 Conv2d, GPT-2 Conv1D, rsLoRA, rank/alpha patterns), the SVD round trip gives PEFT the
same forward, truncation reports the energy kept, DoRA & co. are refused by name, and averaging A's and B's
separately is not averaging B·A."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from headstart.combine import lora_delta as ld
from headstart.combine.merge_math import linear
from headstart.core.errors import BundleError, ConfigError, HeadstartError

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    """A linear layer, a 1x1 and a 3x3 conv: the layer kinds text and image bases adapt."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 6, 1)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.conv(torch.relu(self.pw(x))).flatten(1))))


TARGETS = ["pw", "conv", "fc", "out"]


def _base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def _adapter(base: nn.Module, seed: int = 1, targets=TARGETS, **config):
    """A PEFT LoRA model with random, non-zero A and B (init_lora_weights=False leaves B random too)."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **{"r": 2, "lora_alpha": 4, **config})
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def _saved(model, folder):
    model.save_pretrained(str(folder))
    return ld.read_lora(folder)


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name[len("base_model.model."):]: m.get_delta_weight("default")
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _x(seed: int = 2) -> torch.Tensor:
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "r": 4, "lora_alpha": 3},
                                    {"rank_pattern": {"conv": 3, "f.": 1}, "alpha_pattern": {"out": 5, "p.": 2}}])
def test_deltas_equal_peft_get_delta_weight(tmp_path, config):
    model = _adapter(_base(), **config)
    ours = ld.lora_deltas(_saved(model, tmp_path))
    theirs = _peft_deltas(model)
    assert sorted(ours) == sorted(theirs) == sorted(TARGETS)
    base = dict(_base().named_parameters())
    for path, delta in ours.items():
        assert delta.shape == base[path + ".weight"].shape
        assert _max_diff(delta, theirs[path]) <= 1e-6, path


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    model = _adapter(_base(), use_rslora=True, r=4, lora_alpha=3)
    adapter = _saved(model, tmp_path)
    assert ld.module_scale(adapter.config, "fc", 4) == pytest.approx(3 / 2)
    assert model.base_model.model.fc.scaling["default"] == pytest.approx(3 / 2)
    plain = dict(adapter.config, use_rslora=False)
    assert ld.module_scale(plain, "fc", 4) == pytest.approx(3 / 4)


def test_pattern_keys_match_as_peft_does():
    from peft.utils.other import get_pattern_key

    patterns = ["out", "f.", "layers\\.0\\..*", "conv", "a.b"]
    for name in ["out", "model.out", "fc", "x.f1", "layers.0.q", "model.layers.0.q", "model.layers.10.q",
                 "conv", "pw", "aXb", "my_out", "p.a.b"]:
        key = get_pattern_key(patterns, name)
        assert ld.pattern_key(patterns, name) == (key if key != name or key in patterns else None), name


def test_gpt2_conv1d_fan_in_fan_out_round_trip(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(3, 6)).eval()
    model = _adapter(base, targets=["0", "2"], fan_in_fan_out=True)
    adapter = _saved(model, tmp_path / "a")
    deltas = ld.lora_deltas(adapter)
    theirs = _peft_deltas(model)
    for path, delta in deltas.items():
        assert delta.shape == dict(base.named_parameters())[path + ".weight"].shape  # (in, out): Conv1D's layout
        assert _max_diff(delta, theirs[path]) <= 1e-6
    tensors, ranks, _ = ld.deltas_to_lora(deltas, fan_in_fan_out=True)
    ld.write_lora(tmp_path / "b", adapter.config, tensors, ranks)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval()
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert _max_diff(again(x), model(x)) <= 1e-5


def test_exact_round_trip_gives_peft_the_same_forward(tmp_path):
    base = _base()
    model = _adapter(base, rank_pattern={"fc": 3}, use_rslora=True)
    adapter = _saved(model, tmp_path / "orig")
    deltas = ld.lora_deltas(adapter)
    tensors, ranks, energy = ld.deltas_to_lora(deltas)
    assert ranks == {"pw": 2, "conv": 2, "fc": 3, "out": 2}
    assert energy == {p: 1.0 for p in TARGETS}
    ld.write_lora(tmp_path / "new", adapter.config, tensors, ranks)
    config = json.loads((tmp_path / "new" / ld.CONFIG_FILE).read_text())
    assert (config["use_rslora"], config["use_dora"], config["r"], config["lora_alpha"]) == (False, False, 3, 3)
    assert config["rank_pattern"] == config["alpha_pattern"] == ranks
    assert config["base_model_name_or_path"] == adapter.config["base_model_name_or_path"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "new")).eval()
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith(".weight") and name[:-7] in deltas:
                p += deltas[name[:-7]]
        x = _x()
        assert _max_diff(again(x), model(x)) <= 1e-5
        assert _max_diff(dense(x), model(x)) <= 1e-5
    # and reading the written adapter back gives the same deltas
    for path, delta in ld.lora_deltas(ld.read_lora(tmp_path / "new")).items():
        assert _max_diff(delta, deltas[path]) <= 1e-5


def test_exact_rank_of_a_merge_is_its_numerical_rank(tmp_path):
    base = _base()
    one = ld.lora_deltas(_saved(_adapter(base, seed=1), tmp_path / "1"))
    two = ld.lora_deltas(_saved(_adapter(base, seed=2), tmp_path / "2"))
    merged = {p: linear([one[p], two[p]], [0.5, 0.5]) for p in one}
    tensors, ranks, energy = ld.deltas_to_lora(merged)
    # two rank-2 adapters: rank 4, capped at min(out, in): pw is 3 -> 6 channels, out is 7 -> 3 features
    assert ranks == {"pw": 3, "conv": 4, "fc": 4, "out": 3}
    for p in TARGETS:
        a, b = tensors[ld.PEFT_PREFIX + p + ".lora_A.weight"], tensors[ld.PEFT_PREFIX + p + ".lora_B.weight"]
        assert _max_diff((b.flatten(1) @ a.flatten(1)).reshape(merged[p].shape), merged[p]) <= 1e-5


def test_truncated_rank_reports_the_energy_kept():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(6, 4, generator=g))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    delta = u @ torch.diag(s) @ v.T
    tensors, ranks, energy = ld.deltas_to_lora({"fc": delta}, rank=2)
    assert ranks == {"fc": 2}
    assert energy["fc"] == pytest.approx((16 + 9) / (16 + 9 + 4 + 1), abs=1e-6)
    a, b = tensors["base_model.model.fc.lora_A.weight"], tensors["base_model.model.fc.lora_B.weight"]
    best = u[:, :2] @ torch.diag(s[:2]) @ v[:, :2].T  # Eckart-Young: the best rank-2 approximation
    assert _max_diff(b @ a, best) <= 1e-5
    # a rank above the numerical rank keeps it all and stores no more than needed
    _, ranks, energy = ld.deltas_to_lora({"fc": delta}, rank=6)
    assert ranks == {"fc": 4} and energy == {"fc": 1.0}


def test_conv_kxk_delta_factors_back_to_peft_conv_shapes():
    delta = torch.randn(5, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    tensors, ranks, _ = ld.deltas_to_lora({"conv": delta})
    assert ranks == {"conv": 5}  # min(out, in * 3 * 3)
    a, b = tensors["base_model.model.conv.lora_A.weight"], tensors["base_model.model.conv.lora_B.weight"]
    assert a.shape == (5, 6, 3, 3) and b.shape == (5, 5, 1, 1)


def test_averaging_factors_is_not_averaging_products(tmp_path):
    base = _base()
    adapters = [_saved(_adapter(base, seed=s), tmp_path / str(s)) for s in (1, 2)]
    key = "base_model.model.fc.lora_{}.weight"
    a1, a2 = (ad.tensors[key.format("A")] for ad in adapters)
    b1, b2 = (ad.tensors[key.format("B")] for ad in adapters)
    scale = ld.module_scale(adapters[0].config, "fc", 2)
    factors_mean = ((b1 + b2) / 2) @ ((a1 + a2) / 2) * scale
    products_mean = (b1 @ a1 + b2 @ a2) / 2 * scale
    # the factor mean adds the cross-terms (B1·A2 + B2·A1)/4 that no adapter learned
    cross = (b1 @ a2 + b2 @ a1 - b1 @ a1 - b2 @ a2) / 4 * scale
    assert _max_diff(factors_mean, products_mean + cross) <= 1e-5
    assert _max_diff(factors_mean, products_mean) > 1e-2
    merged = linear([ld.lora_deltas(ad)["fc"] for ad in adapters], [0.5, 0.5])
    assert _max_diff(merged, products_mean) <= 1e-6


def test_dora_is_refused_by_name(tmp_path):
    model = _adapter(_base(), targets=["fc", "out"], use_dora=True)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(BundleError, match="DoRA") as err:
        ld.read_lora(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change,words", [
    ({"use_dora": True}, "DoRA"), ({"init_lora_weights": "pissa"}, "pissa"), ({"bias": "all"}, "biases"),
    ({"modules_to_save": ["head"]}, "modules_to_save"), ({"peft_type": "IA3"}, "IA3"),
])
def test_other_variants_are_refused_by_name(tmp_path, change, words):
    adapter = _adapter(_base(), targets=["fc"])
    adapter.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / ld.CONFIG_FILE).read_text())
    (tmp_path / ld.CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(BundleError, match=words):
        ld.read_lora(tmp_path)


def test_pickle_and_missing_files_are_refused(tmp_path):
    with pytest.raises(BundleError, match="adapter_config.json"):
        ld.read_lora(tmp_path)
    (tmp_path / ld.CONFIG_FILE).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BundleError, match="pickled"):
        ld.read_lora(tmp_path)


def test_write_lora_refuses_mismatched_ranks_and_bad_rank(tmp_path):
    tensors, ranks, _ = ld.deltas_to_lora({"fc": torch.randn(4, 3)})
    with pytest.raises(ConfigError):
        ld.write_lora(tmp_path, {}, tensors, {"fc": ranks["fc"] + 1})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(HeadstartError):
            ld.deltas_to_lora({"fc": torch.randn(4, 3)}, rank=bad)
