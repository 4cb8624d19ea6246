"""Continual-learning strategies: configs and spec parsing, the anchor penalty (L2-SP/EWC), LwF distillation,
and the true diagonal Fisher checked against closed forms on tiny models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from headstart.continual.fisher import (accumulate_fisher, classifier_sampled_nll, fisher_diagonal, head_fisher,
                                        lm_sampled_nll)
from headstart.continual.strategies import (STRATEGIES, AnchorPenalty, Distillation, EWCConfig, L2SPConfig, LwFConfig,
                                            ReplayConfig, auto_strategy, option_names, parse_strategies, scaled,
                                            strategy_spec, without_weight_decay)
from headstart.core.errors import ConfigError
from headstart.engine.batches import EpochShuffle
from headstart.engine.trainer import RunState, TrainSettings, train


class Tiny(nn.Module):
    """A SpecialistModel in miniature: `collate(examples, train)` then `forward(**batch)` -> logits."""

    def __init__(self, dim: int = 2, classes: int = 3):
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def collate(self, examples, train):
        return {"x": torch.stack(examples)}

    def forward(self, x):
        return self.head(x)


# ---- configs, parsing, auto --------------------------------------------------------------------

def test_defaults():
    assert L2SPConfig().weight == 0.01
    assert (EWCConfig().weight, EWCConfig().decay, EWCConfig().max_examples) == (100.0, 0.9, 200)
    assert (LwFConfig().weight, LwFConfig().temperature) == (1.0, 2.0)
    assert ReplayConfig().size == 1000


def test_parse_spec_in_order_with_prefixed_options():
    configs = parse_strategies(" Replay + LWF ", replay_size=50, lwf_weight=2.0, lwf_temperature=None)
    assert list(configs) == ["replay", "lwf"]
    assert configs["replay"].size == 50 and configs["lwf"] == LwFConfig(weight=2.0, temperature=2.0)
    assert strategy_spec(configs) == "replay+lwf"
    assert parse_strategies("ewc", ewc_decay=0.5, ewc_max_examples=10)["ewc"] == EWCConfig(decay=0.5, max_examples=10)
    assert parse_strategies("naive") and parse_strategies("joint")
    assert "l2sp_weight" in option_names() and "replay_size" in option_names()


@pytest.mark.parametrize("spec, options, message", [
    ("replay+foo", {}, "unknown strategy 'foo'"),
    ("", {}, "empty strategy"),
    ("l2sp+", {}, "empty strategy"),
    ("l2sp+l2sp", {}, "twice"),
    ("naive+l2sp", {}, "naive cannot be combined"),
    ("replay+joint", {}, "joint cannot be combined"),
    ("lwf", {"lwf_alpha": 1.0}, "unknown strategy option 'lwf_alpha'"),
    ("lwf", {"bogus": 1.0}, "unknown strategy option 'bogus'"),
    ("lwf", {"ewc_weight": 1.0}, "no ewc"),
    ("lwf", {"lwf_temperature": 0.0}, "temperature must be > 0"),
    ("ewc", {"ewc_decay": 1.5}, "decay must be in"),
    ("replay", {"replay_size": 0}, "size must be >= 1"),
    ("l2sp", {"l2sp_weight": -1.0}, "weight must be >= 0"),
])
def test_parse_errors_are_config_errors(spec, options, message):
    with pytest.raises(ConfigError, match=message):
        parse_strategies(spec, **options)


def test_unknown_strategy_error_lists_the_valid_names():
    with pytest.raises(ConfigError) as e:
        parse_strategies("bogus")
    assert all(name in str(e.value) for name in STRATEGIES)


def test_scaled_multiplies_every_weight_and_copies():
    configs = parse_strategies("l2sp", l2sp_weight=0.5)
    strong = scaled(configs, 10)
    assert strong["l2sp"].weight == 5.0 and configs["l2sp"].weight == 0.5
    both = scaled(parse_strategies("lwf+ewc") | parse_strategies("replay"), 10)
    assert (both["lwf"].weight, both["ewc"].weight, both["ewc"].decay) == (10.0, 1000.0, 0.9)
    assert both["replay"].size == 1000


@pytest.mark.parametrize("scenario, store, spec, word", [
    ("class", "features", "replay", "new labels"),
    ("class", "none", "lwf+ewc", "store none"),
    ("domain", "refs", "replay+l2sp", "drift"),
    ("domain", "none", "ewc", "store none"),
    ("unlabelled", "raw", "replay+l2sp", "guesses"),
    ("unlabelled", "none", "l2sp", "guesses"),
    ("generative", "features", "replay+l2sp", "generator"),
    ("generative", "none", "l2sp", "generator"),
])
def test_auto_strategy(scenario, store, spec, word):
    chosen, why = auto_strategy(scenario, store)
    assert chosen == spec and word in why
    parse_strategies(chosen)  # always a valid spec
    if "replay" in chosen:
        assert "replay" in why


def test_auto_strategy_rejects_unknown_words():
    with pytest.raises(ConfigError, match="scenario"):
        auto_strategy("task", "features")
    with pytest.raises(ConfigError, match="store"):
        auto_strategy("class", "disk")


# ---- anchor penalty and weight decay -----------------------------------------------------------

def test_l2sp_penalty_by_hand_with_grown_rows_and_unanchored_params():
    w = nn.Parameter(torch.arange(12.0).reshape(4, 3))  # grew from 2 classes to 4
    b = nn.Parameter(torch.ones(4))
    fresh = nn.Parameter(torch.ones(5))  # no anchor: not penalised
    anchor = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    hook = AnchorPenalty({"w": w, "b": b, "fresh": fresh}, anchor, weight=0.1)
    expected = 0.5 * 0.1 * (sum(v * v for v in range(6)) + 2)
    assert hook.name == "l2sp"
    assert hook.extra_loss(None, [0]).item() == pytest.approx(expected)
    hook.extra_loss(None, [0]).backward()
    assert torch.allclose(w.grad[:2], 0.1 * w.detach()[:2]) and (w.grad[2:] == 0).all()
    assert (b.grad[2:] == 0).all() and fresh.grad is None


def test_ewc_penalty_weights_each_square_by_importance():
    w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    anchor = {"w": torch.tensor([[0.0, 1.0], [1.0, 1.0]])}
    fisher = {"w": torch.tensor([[2.0, 0.0], [1.0, 0.5]])}
    hook = AnchorPenalty({"w": w}, anchor, fisher, weight=4.0)
    assert hook.name == "ewc"
    assert hook.penalty().item() == pytest.approx(0.5 * 4.0 * (2 * 1 + 0 + 1 * 4 + 0.5 * 9))


def test_penalty_is_dtype_and_device_safe_and_rejects_bad_shapes():
    w = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    hook = AnchorPenalty({"w": w}, {"w": torch.zeros(2, 2, dtype=torch.float32)}, weight=1.0)
    assert hook.penalty().dtype == torch.float32 and hook.penalty().item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="does not fit"):
        AnchorPenalty({"w": w}, {"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="does not fit"):
        AnchorPenalty({"w": w}, {"w": torch.zeros(3, 2)})
    assert AnchorPenalty({"w": w}, {}).extra_loss(None, [0]) is None


def test_without_weight_decay_moves_anchored_params_only():
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = [{"params": [a, b], "lr": 0.1, "weight_decay": 0.01}, {"params": [c], "lr": 1.0, "weight_decay": 0.1}]
    out = without_weight_decay(groups, {"a": a, "c": c})
    assert [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in out] == [
        ([id(b)], 0.1, 0.01), ([id(a)], 0.1, 0.0), ([id(c)], 1.0, 0.0)]
    assert groups[0]["params"] == [a, b]  # the input is unchanged


def test_engine_run_with_a_strong_anchor_stays_near_it():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def run(hooks_for):
        model = nn.Linear(4, 3)
        with torch.no_grad():
            model.weight.zero_(), model.bias.zero_()
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
        step = lambda idx, progress: (F.cross_entropy(model(x[idx]), y[idx]), {}, len(idx))  # noqa: E731
        train(model, plan=EpochShuffle(64, 16, epochs=20, seed=0), step_loss=step,
              param_groups=[{"params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.0}],
              settings=TrainSettings(lr_schedule=lambda s, t: 1.0, grad_clip=0.0),
              hooks=hooks_for(model, anchor), progress=False, log=lambda m: None)
        return sum((p.detach() - anchor[k]).square().sum().item() for k, p in model.named_parameters()) ** 0.5

    free = run(lambda model, anchor: [])
    held = run(lambda model, anchor: [AnchorPenalty(dict(model.named_parameters()), anchor, weight=100.0)])
    assert free > 0.5 and held < free / 20


# ---- distillation ------------------------------------------------------------------------------

def test_distillation_equals_manual_kl_on_the_old_columns():
    torch.manual_seed(1)
    teacher = torch.randn(10, 3)
    student = torch.randn(4, 5, requires_grad=True)  # the head grew from 3 classes to 5
    idx = [7, 2, 2, 9]
    outputs = {"logits": student, "idx": idx}
    hook = Distillation(outputs, teacher, weight=0.5, temperature=2.0)
    p_t = F.softmax(teacher[idx] / 2, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(student[:, :3] / 2, -1))).sum(-1).mean() * 0.5 * 4
    got = hook.extra_loss(None, idx)
    assert got.item() == pytest.approx(manual.item(), rel=1e-5)
    got.backward()
    assert (student.grad[:, 3:] == 0).all() and student.grad[:, :3].abs().sum() > 0


def test_engine_run_with_lwf_keeps_the_old_outputs_of_a_grown_head():
    from headstart.data import Split
    from headstart.methods.training import cross_entropy_step

    torch.manual_seed(0)
    teacher = Tiny(4, 2)
    items = list(torch.randn(48, 4))
    with torch.no_grad():
        teacher_logits = teacher.head(torch.stack(items))
    split = Split(items, [2] * 48)  # the night brings only the new class 2

    def run(weight):
        student = Tiny(4, 3)
        with torch.no_grad():  # the grown head: the old rows, a fresh row for class 2
            student.head.weight[:2], student.head.bias[:2] = teacher.head.weight, teacher.head.bias
        outputs = {}
        hooks = [Distillation(outputs, teacher_logits, weight=weight, temperature=2.0)] if weight else []
        train(student, plan=EpochShuffle(48, 8, epochs=10, seed=0),
              step_loss=cross_entropy_step(student, split, lambda x: x, outputs=outputs),
              param_groups=[{"params": list(student.parameters()), "lr": 0.05, "weight_decay": 0.0}],
              settings=TrainSettings(lr_schedule=lambda s, t: 1.0), hooks=hooks, progress=False, log=lambda m: None)
        with torch.no_grad():
            old = F.log_softmax(student.head(torch.stack(items))[:, :2], -1)
        return F.kl_div(old, F.log_softmax(teacher_logits, -1), reduction="batchmean", log_target=True).item()

    assert run(10.0) < run(0.0) / 5


def test_distillation_is_zero_when_the_student_is_the_teacher():
    teacher = torch.randn(6, 4)
    hook = Distillation({"logits": teacher[[1, 3]].clone(), "idx": [1, 3]}, teacher)
    assert hook.extra_loss(None, [1, 3]).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_catches_a_step_that_filled_nothing_or_another_batch():
    hook = Distillation({}, torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="outputs"):
        hook.extra_loss(None, [0])
    hook.outputs.update(logits=torch.zeros(1, 2), idx=[1])
    with pytest.raises(RuntimeError, match="stale"):
        hook.extra_loss(None, [0])


# ---- Fisher ------------------------------------------------------------------------------------

def _linear_nll(model: nn.Linear, x: torch.Tensor):
    """sampled_nll of a linear classifier on rows of x, labels drawn as classifier_sampled_nll draws them."""
    def nll(i, generator):
        logits = model(x[i:i + 1])
        label = torch.multinomial(logits.softmax(-1).detach(), 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, label, reduction="sum")
    return nll


def _expected_fisher(model: nn.Linear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact E_x E_{y~p}[g^2] by enumerating every label and weighting its squared gradient by p(y)."""
    fw, fb = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    for i in range(len(x)):
        probs = model(x[i:i + 1]).softmax(-1).detach()[0]
        for y in range(model.out_features):
            gw, gb = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), torch.tensor([y])),
                                         [model.weight, model.bias])
            fw += probs[y] * gw.square()
            fb += probs[y] * gb.square()
    return {"weight": fw / len(x), "bias": fb / len(x)}


@pytest.fixture
def linear_head():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    return model, torch.randn(1500, 3)


def test_head_fisher_expected_is_the_enumerated_true_fisher(linear_head):
    model, x = linear_head
    exact = _expected_fisher(model, x[:40])
    closed = head_fisher(x[:40], model.weight, model.bias)
    assert torch.allclose(closed["weight"], exact["weight"], atol=1e-6)
    assert torch.allclose(closed["bias"], exact["bias"], atol=1e-6)
    named = head_fisher(x[:40], model.weight, model.bias, prefix="head")
    assert set(named) == {"head.weight", "head.bias"} and torch.equal(named["head.weight"], closed["weight"])


def test_fisher_diagonal_with_sampled_labels_converges_to_the_true_fisher(linear_head):
    model, x = linear_head
    params = dict(model.named_parameters())
    sampled = fisher_diagonal(params, _linear_nll(model, x), n=len(x), max_examples=None, seed=3)
    exact = head_fisher(x, model.weight, model.bias)
    for k in ("weight", "bias"):
        assert (sampled[k] - exact[k]).abs().max() < 0.1 * exact[k].max()
    assert all(p.grad is None for p in model.parameters())


def test_head_fisher_sampled_equals_fisher_diagonal_with_the_same_generator(linear_head):
    model, x = linear_head
    loop = fisher_diagonal(dict(model.named_parameters()), _linear_nll(model, x), n=len(x), max_examples=50, seed=7)
    closed = head_fisher(x, model.weight, model.bias, max_examples=50, seed=7, expected=False)
    assert torch.allclose(loop["weight"], closed["weight"], atol=1e-6)
    assert torch.allclose(loop["bias"], closed["bias"], atol=1e-6)
    again = fisher_diagonal(dict(model.named_parameters()), _linear_nll(model, x), n=len(x), max_examples=50, seed=7)
    assert torch.equal(again["weight"], loop["weight"])  # seeded


def test_fisher_is_not_the_squared_batch_gradient(linear_head):
    model, x = linear_head
    fisher = head_fisher(x[:200], model.weight, model.bias)
    labels = torch.multinomial(model(x[:200]).softmax(-1).detach(), 1, generator=torch.Generator().manual_seed(0))
    batch_grad = torch.autograd.grad(F.cross_entropy(model(x[:200]), labels.squeeze(1)), model.weight)[0]
    shortcut = batch_grad.square()
    # sampled-label gradients average out to ~0 over a batch: the shortcut is far smaller than the Fisher
    assert shortcut.sum() < 0.1 * fisher["weight"].sum()


def test_fisher_diagonal_restores_mode_and_flags_and_leaves_no_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 2))
    model.train()
    model[0].weight.requires_grad_(False)
    seen = []

    def nll(i, generator):
        seen.append(model.training)
        logits = model(torch.randn(1, 3, generator=generator))
        label = torch.multinomial(logits.softmax(-1).detach(), 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, label)

    fisher = fisher_diagonal({"w0": model[0].weight, "w2": model[2].weight}, nll, n=10, max_examples=4, seed=0,
                             model=model)
    assert seen == [False] * 4  # eval mode: no dropout noise in the Fisher
    assert model.training and not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert set(fisher) == {"w0", "w2"} and fisher["w0"].shape == (5, 3) and (fisher["w0"] > 0).any()


def test_classifier_sampled_nll_on_a_collating_model():
    torch.manual_seed(0)
    model, items = Tiny(2, 3), list(torch.randn(30, 2))
    nll = classifier_sampled_nll(model, items, load=lambda item: item)
    loop = fisher_diagonal(dict(model.head.named_parameters()), nll, n=30, max_examples=30, seed=1, model=model)
    closed = head_fisher(torch.stack(items), model.head.weight, model.head.bias, seed=1, expected=False)
    assert torch.allclose(loop["weight"], closed["weight"], atol=1e-6)


def test_accumulate_fisher_decays_and_pads_grown_rows():
    old = {"w": torch.ones(2, 3), "b": torch.ones(2), "gone": torch.ones(1)}
    new = {"w": torch.full((4, 3), 2.0), "b": torch.full((4,), 2.0), "fresh": torch.ones(2)}
    out = accumulate_fisher(old, new, decay=0.5)
    assert set(out) == {"w", "b", "fresh"}
    assert torch.equal(out["w"][:2], torch.full((2, 3), 2.5)) and torch.equal(out["w"][2:], torch.full((2, 3), 2.0))
    assert torch.equal(out["b"], torch.tensor([2.5, 2.5, 2.0, 2.0])) and torch.equal(out["fresh"], torch.ones(2))
    assert torch.equal(accumulate_fisher(None, new, 0.9)["w"], new["w"])
    with pytest.raises(ValueError, match="does not fit"):
        accumulate_fisher({"w": torch.ones(2, 2)}, {"w": torch.ones(4, 3)}, 0.5)


def test_lm_sampled_nll_on_the_tiny_llm():
    import headstart
    from headstart.llm.tokenize import IGNORE, encode_chat

    base = headstart.load_base("tiny-llm")
    lm, tok = base.lm, base.tokenizer
    rows = [encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in [("hi", "hello"), ("2+2?", "four")]]
    nll = lm_sampled_nll(lm, rows)
    got = nll(0, torch.Generator().manual_seed(5))
    # by hand: full logits, answer positions, tokens drawn with the same generator
    ids = torch.tensor(rows[0]["input_ids"])[None]
    keep = torch.tensor(rows[0]["labels"])[None, 1:] != IGNORE
    log_probs = F.log_softmax(lm(input_ids=ids).logits[:, :-1][keep].float(), -1)
    sampled = torch.multinomial(log_probs.exp().detach(), 1, generator=torch.Generator().manual_seed(5))
    assert got.item() == pytest.approx(-log_probs.gather(1, sampled).sum().item(), rel=1e-4)
    assert int(keep.sum()) == len("hello") + 1  # byte tokens + the end-of-turn marker
    params = {"embed": lm.get_input_embeddings().weight}
    flags = {k: p.requires_grad for k, p in lm.named_parameters()}
    fisher = fisher_diagonal(params, nll, n=2, max_examples=2, seed=0, model=lm)
    assert fisher["embed"].shape == params["embed"].shape and (fisher["embed"] >= 0).all()
    assert fisher["embed"].sum() > 0
    assert {k: p.requires_grad for k, p in lm.named_parameters()} == flags
    assert all(p.grad is None for p in lm.parameters())


def test_fisher_of_lora_adapters_only():
    import headstart
    from headstart.llm.tokenize import encode_chat
    from peft import LoraConfig, get_peft_model

    base = headstart.load_base("tiny-llm")
    peft_model = get_peft_model(base.lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    rows = [encode_chat(base.tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])]
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    fisher = fisher_diagonal(lora, lm_sampled_nll(peft_model, rows), n=1, max_examples=1, seed=0, model=peft_model)
    assert set(fisher) == set(lora)
    # B starts at zero, so the loss depends on A only through B: A's Fisher is 0, B's is not
    assert all(fisher[n].sum() > 0 for n in fisher if "lora_B" in n)
    assert all(fisher[n].sum() == 0 for n in fisher if "lora_A" in n)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
