"""Image bases with a text tower (CLIP / SigLIP) on tiny random models: no weights exist offline.

The real models (`openai/clip-vit-base-patch32`, `google/siglip-base-patch16-224`) load through the
same `load_clip_folder` path these tests drive with folders written by `save_pretrained`.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import headstart
from headstart.bases import load_base
from headstart.bases.clip import ClipBackbone
from headstart.bases.tiny import byte_tokenizer

TEXTS = ["a photo of a red square", "a blue thing", "green stripes on a very long and winding road"]


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(60, 80), (90, 50), (64, 64), (300, 200)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def clip() -> ClipBackbone:
    return load_base("tiny-clip").eval()


def own_logits(base: ClipBackbone, pixel_values: torch.Tensor) -> torch.Tensor:
    """logit_scale * cos(image, text) + bias, from the backbone's two public encoders: [images, texts]."""
    with torch.no_grad():
        image = F.normalize(base(pixel_values=pixel_values), dim=-1)
    text = F.normalize(base.encode_text(TEXTS), dim=-1)
    return base.logit_scale() * image @ text.T + base.logit_bias()


def tiny_siglip_folder(folder):
    """A 2+2-layer SigLIP (32 px, patch 8) with a byte tokenizer and SigLIP's processor, saved like a hub repo."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tokenizer = byte_tokenizer(["<pad>", "</s>", "<unk>"], pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, pad_token_id=0, eos_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        architectures=["SiglipModel"],
    )
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


# -- the tiny registered base ------------------------------------------------------------------
def test_tiny_clip_images_and_texts_share_one_space(clip):
    assert isinstance(clip, ClipBackbone) and clip.kind == "image" and clip.has_text_tower
    feats = clip(**clip.collate(images(3)))
    texts = clip.encode_text(TEXTS)
    assert feats.shape == (3, 16) and texts.shape == (3, 16) and clip.feature_dim == 16
    assert texts.dtype == torch.float32 and not texts.requires_grad
    assert clip.encode_text([]).shape == (0, 16)
    info = clip.info.preprocessing
    assert info["input_size"] == [3, 32, 32] and info["text_max_length"] == 64 and info["text_padding"] == "longest"
    assert clip.collate(images(2), train=True)["pixel_values"].shape == (2, 3, 32, 32)


def test_encode_text_is_deterministic_and_independent_of_batching(clip):
    clip.train()
    a = clip.encode_text(TEXTS)
    b = clip.encode_text(TEXTS, batch_size=1)  # no padding at all vs padded to the longest
    assert clip.training  # encode_text leaves the vision side's mode alone
    assert torch.equal(a, clip.encode_text(TEXTS))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logits_match_clip_models_own(clip):
    x = clip.collate(images(2))["pixel_values"]
    with torch.no_grad():
        reference = clip.clip_model(pixel_values=x, **clip.tokenize_text(TEXTS)).logits_per_image
    assert clip.logit_bias() == 0.0
    torch.testing.assert_close(own_logits(clip, x), reference, atol=1e-5, rtol=1e-5)


def test_eval_preprocessing_matches_the_transformers_processor(clip):
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = clip.collate(images(4))["pixel_values"]
    theirs = reference(images=images(4), return_tensors="pt")["pixel_values"]
    assert (ours - theirs).abs().max() < 0.05 and (ours - theirs).abs().mean() < 1e-3  # resampler rounding only


def test_text_tower_is_frozen_and_outside_the_backbone(clip):
    vision = ("vision_model.", "visual_projection.")
    text = [p for n, p in clip.clip_model.named_parameters() if not n.startswith(vision)]
    assert text and not any(p.requires_grad for p in text)
    ids = {id(p) for p in text}
    in_blocks = [id(p) for _, b in clip.blocks() for p in b.parameters()]
    assert not ids & set(in_blocks) and not ids & {id(p) for p in clip.parameters()}
    # every vision parameter lies in exactly one block, and they are all the backbone has
    assert len(in_blocks) == len(set(in_blocks)) and set(in_blocks) == {id(p) for p in clip.parameters()}
    assert all(p.requires_grad for p in clip.parameters())
    assert clip.info.params == sum(p.numel() for p in clip.parameters())
    assert all(k.startswith(vision) for k in clip.state_dict())
    assert [n for n, _ in clip.blocks()] == ["embeddings", "layers.0", "layers.1", "head"]
    clip.requires_grad_(True)  # what `scratch` does: still cannot reach the text tower
    assert not any(p.requires_grad for p in text)
    clip.to(torch.float64)  # the unregistered text tower moves along
    assert clip.clip_model.text_projection.weight.dtype == torch.float64
    assert clip.clip_model.logit_scale.dtype == torch.float64


def test_lora_targets_only_the_vision_tower(clip):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    targets = clip.lora_target_modules()
    # applied to the whole image-text model, the text tower's identically named layers stay untouched
    whole = get_peft_model(copy.deepcopy(clip.clip_model), LoraConfig(r=2, target_modules=targets))
    adapted = [n for n, m in whole.named_modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 2 * 4 and all(".vision_model.encoder." in n for n in adapted)
    assert not any("text" in n for n, _ in whole.named_parameters() if "lora_A" in n)
    # applied to the backbone (what the lora method does): text features unchanged, vision a no-op at start
    x = clip.collate(images(2))
    with torch.no_grad():
        before = clip(**x)
    text_before = clip.encode_text(TEXTS)
    model = get_peft_model(clip, LoraConfig(r=2, target_modules=targets))
    assert not any(isinstance(m, LoraLayer) for m in clip.clip_model.text_model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**x), before)
    torch.testing.assert_close(clip.encode_text(TEXTS), text_before)


def test_set_input_size_interpolates_position_embeddings(clip):
    clip.set_input_size(48)
    assert clip.info.preprocessing["input_size"] == [3, 48, 48]
    x = clip.collate(images(2))
    assert x["pixel_values"].shape == (2, 3, 48, 48) and clip(**x).shape == (2, 16)
    with pytest.raises(ValueError):
        clip.set_input_size(8)


# -- folders (resolve.py) ------------------------------------------------------------------------
def test_clip_folder_loads_back_with_identical_outputs(clip, tmp_path):
    from transformers import CLIPImageProcessor

    clip.clip_model.save_pretrained(tmp_path)
    clip.tokenizer.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.25] * 3, resample=2).save_pretrained(tmp_path)
    again = headstart.load_base(str(tmp_path)).eval()
    assert isinstance(again, ClipBackbone) and again.info.name == str(tmp_path)
    assert again.info.sha256 not in ("unknown", clip.info.sha256) and len(again.info.sha256) == 64
    pre = again.info.preprocessing  # read from preprocessor_config.json
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3 and pre["interpolation"] == "bilinear"
    assert pre["crop_pct"] == pytest.approx(32 / 40) and pre["crop_mode"] == "center"
    x = again.collate(images(3))
    with torch.no_grad():
        torch.testing.assert_close(again(**x), clip(**x), atol=0, rtol=0)
    torch.testing.assert_close(again.encode_text(TEXTS), clip.encode_text(TEXTS), atol=0, rtol=0)
    assert again.logit_scale() == clip.logit_scale()
    assert again.lora_target_modules() == clip.lora_target_modules()


def test_siglip_folder_reproduces_siglip_logits(tmp_path):
    reference_model = tiny_siglip_folder(tmp_path)
    base = headstart.load_base(str(tmp_path)).eval()
    assert isinstance(base, ClipBackbone) and base.info.architecture == "SiglipModel"
    assert base.feature_dim == 32 and base.info.preprocessing["crop_mode"] == "squash"
    tokens = base.tokenize_text(TEXTS)
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape == (3, 24)  # padded to max_length, no mask
    x = base.collate(images(2))["pixel_values"]
    with torch.no_grad():
        reference = reference_model(pixel_values=x, **tokens).logits_per_image
    assert base.logit_bias() == pytest.approx(-3.0)
    torch.testing.assert_close(own_logits(base, x), reference, atol=1e-5, rtol=1e-5)
    names = [n for n, _ in base.blocks()]
    assert names[0] == "embeddings" and names[-1] == "head"
    params = [p for _, b in base.blocks() for p in b.parameters()]
    assert len(params) == len({id(p) for p in params}) == len(list(base.parameters()))
    assert all(".encoder.layers." in t for t in base.lora_target_modules())  # not the pooling head


# -- end to end ----------------------------------------------------------------------------------
def test_fit_probe_on_tiny_clip(tiny_image_folder):
    spec = headstart.fit(tiny_image_folder, base="tiny-clip", method="probe", progress=False, log=lambda s: None)
    assert spec.manifest["base"]["name"] == "tiny-clip"
    assert 0.0 <= spec.manifest["metrics"]["accuracy"] <= 1.0


def test_fit_zeroshot_uses_the_models_logit_scale(tiny_image_folder):
    spec = headstart.fit(tiny_image_folder, base="tiny-clip", method="zeroshot", progress=False, log=lambda s: None)
    assert spec.manifest["details"]["scale"] == pytest.approx(load_base("tiny-clip").logit_scale())


def test_finetune_bundle_never_holds_the_text_tower(tiny_image_folder, tmp_path):
    from safetensors.torch import load_file

    headstart.fit(tiny_image_folder, base="tiny-clip", method="finetune", epochs=1, progress=False,
                  out=tmp_path / "b", log=lambda s: None)
    keys = list(load_file(str(tmp_path / "b" / "trained.safetensors")))
    assert any("vision_model" in k for k in keys) and not any("text" in k or "logit" in k for k in keys)
