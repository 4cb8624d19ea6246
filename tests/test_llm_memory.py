"""Memory of adapter training: the chunked LM-head loss, gradient accumulation, checkpointing and the budget plan."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import headstart
from headstart.core.errors import ConfigError
from headstart.engine.memory import GB, MB, Budget, MemoryBudgetError, parse_size, plan_micro_batch, resolve_budget
from headstart.llm import lm_head

from conftest import assert_clean_error, headstart_cli
from test_llm_tasks import QUIET, alpaca_rows, tiny_lora_and_batch, write_jsonl

TINY = {"epochs": 2, "batch_size": 4, "lr": 5e-3, "max_length": 96, "side_by_side": 0, "bf16": "false", "dropout": 0.0}


def reference_logps(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_target_logps_equal_the_full_logits_values_and_gradients(monkeypatch, autocast):
    monkeypatch.setattr(lm_head, "CHUNK_ROWS", 7)  # 20 rows: three chunks, the last one short
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden, targets, weights = torch.randn(20, 16), torch.randint(0, 50, (20,)), torch.randn(20)
    results = []
    for fn in (lm_head.target_logps, reference_logps):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps = fn(head, h, targets)
        (logps * weights).sum().backward()  # per-token weights, as DPO's per-sequence sums give
        results.append((logps.detach(), h.grad))
    tol = 1e-2 if autocast else 1e-5
    torch.testing.assert_close(results[0][0], results[1][0], atol=tol, rtol=tol)
    torch.testing.assert_close(results[0][1], results[1][1], atol=tol, rtol=tol)
    assert results[0][0].dtype == torch.float32


def test_a_trained_head_takes_the_plain_path_and_gets_its_gradient():
    head = nn.Linear(8, 30, bias=False)
    logps = lm_head.target_logps(head, torch.randn(5, 8), torch.randint(0, 30, (5,)))
    logps.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_summed_answer_logps_equal_the_logits_path_of_dpo():
    from headstart.llm.train import summed_answer_logps
    from headstart.methods.dpo.maths import sequence_logps

    peft_model, batch = tiny_lora_and_batch()
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(summed_answer_logps(peft_model, batch), sequence_logps(logits, batch["labels"]),
                                   atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-memory")
    # answers of different lengths: a token-weighted mean differs from a per-example one
    rows = alpaca_rows(12) + [{"instruction": "Say a long thing.", "input": "", "output": "blue green white " * 6}] * 4
    return write_jsonl(root / "train.jsonl", rows), write_jsonl(root / "test.jsonl", alpaca_rows(4))


def test_micro_batches_and_checkpointing_train_the_same_adapter(sft_data):
    """Gradient accumulation weighs each part by its answer tokens: 4 sequences at once, or 1 + 1 + 1 + 1 with
    checkpointing, give the same loss curve and the same held-out loss (no dropout: its masks would differ)."""
    train, test = sft_data
    runs = [headstart.fit(train, base="tiny-llm", task="sft", method="lora", eval=test, seed=3, **QUIET, **TINY, **o)
            for o in ({"micro_batch": 0, "gradient_checkpointing": "false"},
                      {"micro_batch": 1, "gradient_checkpointing": "true"})]
    whole, parts = (r.manifest["metrics"] for r in runs)
    assert whole["eval_loss"] < whole["eval_loss_before"]
    assert whole["eval_loss"] == pytest.approx(parts["eval_loss"], abs=1e-4)
    for a, b in zip(runs[0].manifest["history"], runs[1].manifest["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_the_plan_picks_the_largest_micro_batch_that_fits():
    costs = {"on": 100 * MB, "off": 800 * MB}
    assert plan_micro_batch(Budget(6 * GB, "test"), fixed=GB, per_example=costs, batch_size=8).micro_batch == 8
    plan = plan_micro_batch(Budget(GB + 450 * MB, "test"), fixed=GB, per_example=costs, batch_size=8)
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (4, 2, "on")
    off_first = plan_micro_batch(Budget(10 * GB, "test"), fixed=GB, per_example={"off": 800 * MB, "on": 100 * MB},
                                 batch_size=8)
    assert (off_first.micro_batch, off_first.checkpointing) == (8, "off")
    with pytest.raises(MemoryBudgetError, match=r"1.00 GB .*1.10 GB"):
        plan_micro_batch(Budget(GB, "test"), fixed=GB, per_example=costs, batch_size=8)


@pytest.mark.parametrize("text,size", [("6GB", 6 * GB), ("512mb", 512 * MB), ("1.5GiB", int(1.5 * GB)), ("2", 2 * GB)])
def test_memory_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "6 parsecs", "1MB", "-3GB"])
def test_bad_memory_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_the_default_budget_is_a_share_of_free_memory():
    budget = resolve_budget(None)
    assert 0 < budget.bytes and "free" in budget.source


def test_a_run_that_cannot_fit_stops_before_training_with_the_numbers(sft_data, tmp_path):
    train, test = sft_data
    lines: list[str] = []
    with pytest.raises(MemoryBudgetError, match="does not fit in 100 MB"):
        headstart.fit(train, base="tiny-llm", task="sft", eval=test, memory_budget="100MB", progress=False,
                      log=lines.append, **TINY)
    assert not any("held-out loss after" in line for line in lines)
    r = headstart_cli("fit", train, "--base", "tiny-llm", "--task", "sft", "--eval", test, "--memory-budget", "100MB",
                      "--side-by-side", "0", "--out", tmp_path / "never")
    assert_clean_error(r, "does not fit in 100 MB")
    assert not (tmp_path / "never").exists()


def test_qlora_generation_on_float_copies_gives_the_4bit_answer_and_restores_the_layers(monkeypatch):
    """Without AVX512-BF16 the 4-bit layers run on float copies made once per answer: same logits as the
    per-forward de-quantisation, and afterwards every layer is back on its 4-bit path."""
    import bitsandbytes.functional as bnbf

    from headstart.llm import model as lm_model

    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: False)
    lm, _, _ = lm_model.load_lm("tiny-llm", quantize="nf4")
    peft_model = lm_model.add_lora(lm, r=4).eval()
    layers = [m for m in peft_model.modules() if isinstance(m, lm_model._bnb().nn.Linear4bit)]
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        four_bit = peft_model(input_ids=ids).logits
        with lm_model.bnb_cpu_inference(peft_model):
            assert all("forward" in m.__dict__ for m in layers)
            dense = peft_model(input_ids=ids).logits
    torch.testing.assert_close(dense, four_bit, atol=1e-4, rtol=1e-4)
    assert not any("forward" in m.__dict__ for m in layers)


def test_the_plan_takes_the_fastest_candidate_the_budget_allows():
    """A roomy budget trains without checkpointing, two sequences per forward (the fastest on a CPU), glibc
    keeping freed blocks; a budget with no room for glibc's retention returns freed blocks; each estimate
    fits its budget; a batch of one is never split."""
    from headstart.engine.memory import rss_bytes
    from headstart.llm.footprint import plan_adapter_memory
    from headstart.llm.train import answer_loss

    peft_model, batch = tiny_lora_and_batch()
    plans, logs = [], []
    for budget in (Budget(rss_bytes() + 8 * GB, "test"), Budget(int(rss_bytes() * 1.1) + 16 * MB, "test")):
        plans.append(plan_adapter_memory(peft_model, lambda: answer_loss(peft_model, batch), tokens=96, batch_size=4,
                                         checkpointing="auto", micro_batch=0, budget=budget, log=logs.append))
    roomy, tight = plans
    assert (roomy.checkpointing, roomy.micro_batch, roomy.accumulation) == ("off", 2, 2)
    assert "keeps freed blocks" in logs[0]
    assert "go back to the OS" in logs[2]
    assert tight.estimate < roomy.estimate
    assert all(p.estimate <= p.budget.bytes for p in plans)
    single = plan_adapter_memory(peft_model, lambda: answer_loss(peft_model, batch), tokens=96, batch_size=1,
                                 checkpointing="auto", micro_batch=0, budget=plans[0].budget, log=logs.append)
    assert (single.micro_batch, single.accumulation) == (1, 1)
    pairs = plan_adapter_memory(peft_model, lambda: answer_loss(peft_model, batch), tokens=96, batch_size=4,
                                checkpointing="auto", micro_batch=0, budget=plans[0].budget, log=logs.append,
                                sequences_per_example=2)
    assert (pairs.micro_batch, pairs.accumulation) == (1, 4)  # one pair = two sequences per forward
