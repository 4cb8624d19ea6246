"""A fit never changes the method object's config; the config it used (kind defaults filled in) comes back as
`FitResult.config` for the manifest. (zeroshot and incontext: see test_fewshot.py.)"""
from __future__ import annotations

import pytest

import headstart
from headstart.data import Split, load_dataset
from headstart.methods.base import FitContext
from headstart.methods.registry import make_method


@pytest.mark.parametrize("method,base,fixture,options,resolved", [
    ("adabn", "tiny-image", "tiny_image_folder", {}, {"epochs": 30, "batch_size": 64}),
    ("selftrain", "tiny-text", "tiny_text_csv", {}, {"rounds": 3, "epochs": 30}),
])
def test_adaptation_fit_returns_the_resolved_config_and_keeps_its_own(request, method, base, fixture, options,
                                                                        resolved):
    data = load_dataset(request.getfixturevalue(fixture))
    train = data.split("train")
    target = Split(list(train.items), [-1] * len(train))
    m = make_method(method, **options)
    given = m.config.to_json()
    result = m.fit(headstart.load_base(base), data, FitContext(progress=False, log=lambda s: None, target=target))
    assert m.config.to_json() == given and getattr(m, "_trainer", None) is None
    assert type(result.config) is type(m.config)
    assert {k: getattr(result.config, k) for k in resolved} == resolved
    assert all(given[k] is None for k in resolved)
