"""core.config.Config: the one base of method configs (JSON round trip, per-base-kind defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from headstart.core.config import Config
from headstart.core.errors import ConfigError
from headstart.methods.auto.config import AutoConfig
from headstart.methods.incontext.config import InContextConfig
from headstart.methods.probe.config import ProbeConfig
from headstart.methods.prototype.config import PrototypeConfig
from headstart.methods.setfit.config import SetFitConfig
from headstart.methods.zeroshot.config import ZeroShotConfig


@dataclass
class Toy(Config):
    lr: float | None = None
    epochs: int | None = None
    grid: list[float] = field(default_factory=lambda: [1.0, 2.0])

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @classmethod
    def kind_defaults(cls):
        return {"image": {"lr": 1e-3, "epochs": 5}, "text": {"lr": 1e-4}}


def test_resolved_fills_only_none_options_and_leaves_the_original_alone():
    given = Toy(epochs=2)
    image = given.resolved("image")
    assert (image.lr, image.epochs) == (1e-3, 2)  # a value the user gave wins over the kind default
    assert given == Toy(epochs=2)  # never mutated
    assert given.resolved("causal_lm").lr == 1e-4  # unknown kinds use the text row
    original = Toy()
    resolved = original.resolved("image")
    resolved.grid.append(9.0)
    assert original.grid == [1.0, 2.0]  # a deep copy: no list is shared


def test_json_round_trip_copies_and_validates():
    cfg = Toy(lr=0.5, grid=[3.0])
    data = cfg.to_json()
    data["grid"].append(4.0)
    assert cfg.grid == [3.0]  # the JSON is a copy
    assert Toy.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown option.*typo"):
        Toy.from_json({"lr": 1.0, "typo": 2})
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        Toy.from_json({"epochs": 0})


@pytest.mark.parametrize("cls", [AutoConfig, InContextConfig, ProbeConfig, PrototypeConfig, SetFitConfig,
                                 ZeroShotConfig])
def test_method_configs_share_the_base(cls):
    assert issubclass(cls, Config) and "to_json" not in vars(cls)
    cfg = cls()
    assert cls.from_json(cfg.to_json()) == cfg
    for kind in ("image", "text", "causal_lm"):
        resolved = cfg.resolved(kind)
        assert type(resolved) is cls and cfg == cls()


def test_setfit_kind_defaults_fill_the_learning_rate():
    assert SetFitConfig().resolved("image").lr == 1e-4
    assert SetFitConfig().resolved("text").lr == 8e-5
    assert SetFitConfig(lr=1e-3).resolved("image").lr == 1e-3
    assert SetFitConfig().l2_grid == ProbeConfig().l2_grid == [1e-4, 1e-3, 1e-2, 1e-1]
