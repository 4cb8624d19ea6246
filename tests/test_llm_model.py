"""headstart.llm model / generate / export on tiny-llm: NF4 on the CPU, the bnb repacking trap, LoRA merge."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import headstart
from headstart.bases.causal_lm import CausalLMBackbone
from headstart.llm.export import adapter_on_fp32_base, merge_adapter_into_base, save_merged
from headstart.llm.generate import generate, render_prompt, stop_token_ids
from headstart.llm.model import (
    add_lora,
    bnb_cpu_inference,
    base_folder,
    cpu_supports_bf16,
    guard_bnb_cpu,
    load_lm,
    quantize_linears_nf4,
    weight_memory_bytes,
)

bnb = pytest.importorskip("bitsandbytes")
HAS_AVX512BF16 = __import__("bitsandbytes.functional", fromlist=["x"]).has_avx512bf16()
needs_avx512bf16 = pytest.mark.skipif(not HAS_AVX512BF16, reason="bitsandbytes' CPU repacking needs AVX512-BF16")


def _batch(vocab: int = 200, b: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, t), generator=g)


def _wider_backbone(hidden: int = 256, intermediate: int = 512) -> CausalLMBackbone:
    """tiny-llm's tokenizer on a wider 2-layer Llama, so Linear weights dominate the embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = headstart.load_base("tiny-llm").tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=intermediate, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = LlamaForCausalLM(config).eval()
    return CausalLMBackbone(lm, tok, name="wide-llm", source="test", sha256="")


def _perturb_lora_b(model: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _lora_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if "lora_" in n}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# ---------------------------------------------------------------- load_lm / nf4


def test_nf4_replaces_every_linear_but_lm_head():
    lm, tokenizer, info = load_lm("tiny-llm", quantize="nf4")
    assert info.name == "tiny-llm" and tokenizer.eos_token == "<|im_end|>"
    names = {n: type(m) for n, m in lm.named_modules()}
    projections = [n for n in names if n.rsplit(".", 1)[-1].endswith("_proj")]
    assert len(projections) == 2 * 7
    assert all(names[n] is bnb.nn.Linear4bit for n in projections)
    assert type(lm.lm_head) is nn.Linear and lm.lm_head.weight.dtype == torch.float32
    assert type(lm.get_input_embeddings()) is nn.Embedding
    q = lm.model.layers[0].self_attn.q_proj
    assert q.weight.quant_type == "nf4" and q.weight.compress_statistics  # double quant
    assert q.compute_dtype == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert q.support_avx512bf16_for_cpu is False  # guarded at load


def test_nf4_of_a_backbone_keeps_its_fp32_lm_and_saves_linear_memory():
    backbone = _wider_backbone()
    fp32_lm, _, _ = load_lm(backbone)
    assert fp32_lm is backbone.lm
    nf4_lm, _, _ = load_lm(backbone, quantize="nf4")
    assert all(type(m) is nn.Linear for n, m in backbone.lm.named_modules() if n.endswith("_proj"))

    def linear_bytes(lm: nn.Module) -> int:
        return sum(weight_memory_bytes(m) for n, m in lm.named_modules() if n.endswith("_proj"))

    ratio = linear_bytes(nf4_lm) / linear_bytes(fp32_lm)
    assert ratio <= 0.35, ratio
    assert weight_memory_bytes(nf4_lm) < weight_memory_bytes(fp32_lm)
    ids = _batch()
    assert _corr(_logits(nf4_lm, ids), _logits(fp32_lm, ids)) > 0.95


def test_nf4_logits_close_to_fp32_on_tiny_llm():
    fp32_lm, _, _ = load_lm("tiny-llm")
    nf4_lm, _, _ = load_lm("tiny-llm", quantize="nf4")
    ids = _batch()
    assert _corr(_logits(nf4_lm, ids), _logits(fp32_lm, ids)) > 0.95


def test_weight_memory_counts_tied_weights_once():
    lm, _, _ = load_lm("tiny-llm")
    unique = {id(p): p for p in lm.parameters()}.values()
    expected = sum(p.numel() * 4 for p in unique) + sum(b.numel() * b.element_size() for b in lm.buffers())
    assert weight_memory_bytes(lm) == expected


def test_base_folder(tmp_path):
    from headstart.bases.causal_lm import load_causal_lm_folder

    tiny = headstart.load_base("tiny-llm")
    assert base_folder(tiny) is None
    tiny.lm.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = load_causal_lm_folder(tmp_path / "tiny", name="tiny-folder")
    assert base_folder(loaded) == tmp_path / "tiny"
    nf4_lm, _, _ = load_lm(loaded, quantize="nf4")  # a folder-backed base quantises the same way
    assert isinstance(nf4_lm.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)


def test_load_lm_rejects_unknown_quantize():
    with pytest.raises(ValueError, match="quantize"):
        load_lm("tiny-llm", quantize="int3")


# ---------------------------------------------------------------- the bnb CPU repacking trap


@pytest.mark.parametrize("base", ["tiny-llm", "wide"])
def test_qlora_grads_survive_generate(base):
    """THE TRAP: generate() (an eval forward) before training must not cut the backward.

    "wide" (hidden 64): every 4-bit layer fits bitsandbytes' packed CPU layout, which generate()
    uses; on tiny-llm only down_proj does.
    """
    lm, tokenizer, _ = load_lm("tiny-llm" if base == "tiny-llm" else _wider_backbone(64, 128), quantize="nf4")
    model = add_lora(lm, r=4, alpha=8, dropout=0.0)
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    _perturb_lora_b(model)  # B = 0 at init would make every lora_A grad zero anyway
    ids = _batch()
    reference = _lora_grads(model, ids)

    generate(model, tokenizer, "hello", max_new_tokens=4, temperature=0)
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)  # a plain eval forward too
    grads = _lora_grads(model, ids)

    assert len(grads) == 2 * 7 * 2
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_avx512bf16
def test_trap_reproduces_without_the_guard_and_guard_repairs_it():
    """Demonstrates why guard_bnb_cpu exists (bitsandbytes 0.50.2, AVX512-BF16 CPU).

    Unguarded, an eval forward repacks the 4-bit weights into a layout without autograd: the
    next training step silently loses the gradient through the base layers (most LoRA grads
    become zero). guard_bnb_cpu converts the weights back, and the gradients return.
    """
    # every Linear's out_features a multiple of 32: the repacking asserts it (tiny-llm's k/v have 16)
    backbone = _wider_backbone(hidden=64, intermediate=128)
    lm = backbone.lm
    quantize_linears_nf4(lm, compute_dtype=torch.bfloat16)
    model = add_lora(lm, r=4, alpha=8, dropout=0.0)
    _perturb_lora_b(model)
    ids = _batch()
    reference = _lora_grads(model, ids)
    assert all(g is not None and g.abs().sum() > 0 for g in reference.values())

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU: no guard
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        broken = _lora_grads(model, ids)
    def rel_err(g: torch.Tensor | None, ref: torch.Tensor) -> float:
        return 1.0 if g is None else float((g - ref).norm() / ref.norm())

    # silently wrong: no error, but the gradient through the 4-bit base layers is gone
    # (measured: 0.15-1.06 relative error; with B = 0 at init, most lora_B grads are exactly 0)
    wrong = [n for n, g in broken.items() if rel_err(g, reference[n]) > 0.1]
    assert len(wrong) >= len(broken) // 2, wrong

    assert guard_bnb_cpu(model) == len(layers)
    assert not any(m.weight.quant_state.packing_format_for_cpu for m in layers)
    repaired = _lora_grads(model, ids)
    for name, g in repaired.items():
        assert g is not None and g.abs().sum() > 0, name
        # the round trip re-quantises the absmax statistics: close to, not equal to, the reference
        assert rel_err(g, reference[name]) < 0.05, name


def _snapshot(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            out.append((m.weight.data.clone(), qs.absmax.clone(), qs.state2.absmax.clone()))
    return out


@needs_avx512bf16
def test_fast_inference_layout_is_used_then_restored_exactly():
    lm, tokenizer, _ = load_lm("tiny-llm", quantize="nf4")
    model = add_lora(lm, r=4)
    before = _snapshot(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    with pytest.raises(RuntimeError, match="boom"):
        with bnb_cpu_inference(model) as fast:
            assert fast == 2  # down_proj only: the layout needs in_features % 64 == 0 and out_features % 32 == 0
            model.eval()
            with torch.no_grad():
                model(input_ids=_batch())
            assert sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers) == fast
            raise RuntimeError("boom")  # restored even when generation fails
    after = _snapshot(model)
    assert all(torch.equal(x, y) for a, b in zip(before, after) for x, y in zip(a, b))
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    generate(model, tokenizer, "hi", max_new_tokens=5, temperature=0)
    after = _snapshot(model)
    assert all(torch.equal(x, y) for a, b in zip(before, after) for x, y in zip(a, b))


# ---------------------------------------------------------------- generate


def _manual_greedy(lm: nn.Module, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(tokenizer)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(lm(input_ids=ids).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_greedy_is_deterministic_and_matches_argmax_loop():
    lm, tokenizer, _ = load_lm("tiny-llm")
    a = generate(lm, tokenizer, "What is 2+2?", max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    b = generate(lm, tokenizer, "What is 2+2?", max_new_tokens=10, temperature=0, repetition_penalty=1.0, seed=123)
    assert a == b
    assert a == _manual_greedy(lm, tokenizer, "What is 2+2?", 10)
    assert len(a) > 0


def test_stream_pieces_concatenate_and_modes_are_restored():
    lm, tokenizer, _ = load_lm("tiny-llm")
    lm.train()
    lm.model.layers[0].eval()  # a mixed state must come back as it was
    pieces: list[str] = []
    text = generate(lm, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=24, temperature=1.0,
                    seed=7, stream=pieces.append)
    assert pieces and "".join(pieces) == text
    assert lm.training and not lm.model.layers[0].training and lm.model.layers[1].training
    rng = torch.get_rng_state()
    assert generate(lm, tokenizer, "hi", max_new_tokens=24, temperature=1.0, seed=7) == text  # seeded
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched


def test_stops_at_end_of_turn():
    lm, tokenizer, _ = load_lm("tiny-llm")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tokenizer)
    head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.lm_head.weight)
        head.bias.zero_()
        head.bias[im_end] = 1e4  # always end the turn
    lm.lm_head = head
    calls = []
    lm.register_forward_hook(lambda *a: calls.append(1))
    pieces: list[str] = []
    text = generate(lm, tokenizer, "hi", max_new_tokens=20, temperature=0, stream=pieces.append)
    assert text == "" and "".join(pieces) == ""
    assert len(calls) == 1  # stopped after the first token instead of running 20 steps
    with torch.no_grad():
        head.bias[im_end] = 0.0
    text = generate(lm, tokenizer, "hi", max_new_tokens=20, temperature=1.0)
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_generate_on_peft_and_nf4_models():
    lm, tokenizer, _ = load_lm("tiny-llm", quantize="nf4")
    model = add_lora(lm, r=4)
    model.train()
    text = generate(model, tokenizer, "hi", max_new_tokens=6, temperature=0)
    assert isinstance(text, str) and model.training


# ---------------------------------------------------------------- export


def test_merge_and_save_reproduce_peft_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, tokenizer, _ = load_lm("tiny-llm")
    ids = _batch()
    base_logits = _logits(lm, ids)
    model = add_lora(lm, r=4, alpha=8, dropout=0.0)
    _perturb_lora_b(model)
    peft_logits = _logits(model, ids)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter is not a no-op

    merged = merge_adapter_into_base(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(_logits(merged, ids), peft_logits, atol=1e-4, rtol=1e-4)

    out = save_merged(merged, tokenizer, tmp_path / "merged")
    save_merged(merged, tokenizer, tmp_path / "merged")  # overwriting an existing folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary leftovers
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(reloaded, ids), peft_logits, atol=1e-4, rtol=1e-4)
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2("héllo <|im_end|>")["input_ids"] == tokenizer("héllo <|im_end|>")["input_ids"]
    assert render_prompt(tok2, "hi") == render_prompt(tokenizer, "hi")


def test_merge_refuses_4bit_base():
    lm, tokenizer, _ = load_lm("tiny-llm", quantize="nf4")
    model = add_lora(lm, r=4)
    with pytest.raises(ValueError, match="4-bit"):
        merge_adapter_into_base(model)
    with pytest.raises(TypeError):
        save_merged(model, tokenizer, __import__("pathlib").Path("/nonexistent/never-written"))


def test_qlora_adapter_merges_on_fp32_base(tmp_path):
    nf4_lm, _, _ = load_lm("tiny-llm", quantize="nf4")
    qlora = add_lora(nf4_lm, r=4, alpha=8, dropout=0.0)
    _perturb_lora_b(qlora)
    qlora.save_pretrained(tmp_path / "adapter")
    ids = _batch()
    qlora_logits = _logits(qlora, ids)

    fp32_lm, _, _ = load_lm("tiny-llm")
    with pytest.raises(ValueError, match="4-bit"):
        adapter_on_fp32_base(tmp_path / "adapter", nf4_lm)
    on_fp32 = adapter_on_fp32_base(tmp_path / "adapter", fp32_lm)
    src = {n: p for n, p in qlora.named_parameters() if "lora_" in n}
    dst = {n: p for n, p in on_fp32.named_parameters() if "lora_" in n}
    assert src.keys() == dst.keys()
    assert all(torch.equal(src[n], dst[n]) for n in src)
    fp32_logits = _logits(on_fp32, ids)
    merged = merge_adapter_into_base(on_fp32)
    torch.testing.assert_close(_logits(merged, ids), fp32_logits, atol=1e-4, rtol=1e-4)
    assert _corr(fp32_logits, qlora_logits) > 0.95
