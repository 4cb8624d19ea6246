"""Tiny random bases for tests: built from configs in well under a second, no download.

They go through exactly the same backbone classes as the real bases, so an end-to-end test
on `tiny-text` exercises the code path of `minilm-l6`. Initialisation is seeded inside
each builder (without disturbing the caller's RNG), so their weights and sha256 are stable.
The tokenizers are built in memory (byte level: any string is encodable) so the tiny bases
work without any weights package installed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .pretrained import PretrainedCfg
from .registry import register_base

if TYPE_CHECKING:  # each builder imports what it needs: listing bases must not load torch
    from .causal_lm import CausalLMBackbone
    from .clip import ClipBackbone
    from .image import TimmImageBackbone
    from .text import HFTextBackbone

M = TypeVar("M")
SOURCE = "random init (tiny test config)"
LICENSE = "apache-2.0"  # random weights made by headstart's own code, under the project's licence

# ChatML, as SmolLM2 uses, so chat formatting code runs unchanged on tiny-llm.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _seeded(build: Callable[[], M]) -> M:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _stamp(backbone: M) -> M:
    from .weights import state_dict_sha256

    backbone.info.sha256 = state_dict_sha256(backbone)
    return backbone


def byte_tokenizer(specials: list[str], template: tuple[str, str] | None = None, **roles: str):
    """A byte-level tokenizer: `specials` get ids 0.., then one token per byte (no merges).

    `template` = (first, last) special tokens wrapped around every sequence (BERT's CLS/SEP);
    `roles` name the special tokens (pad_token="[PAD]", eos_token=...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if template is not None:
        first, last = template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first} $A {last}",
            pair=f"{first} $A {last} $B:1 {last}:1",
            special_tokens=[(first, vocab[first]), (last, vocab[last])],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **roles)


def _tiny(kind: str, params: int, feature_dim: int, architecture: str, sha256: str, **pre: Any) -> PretrainedCfg:
    return PretrainedCfg(kind=kind, params=params, feature_dim=feature_dim, preprocessing=pre, sha256=sha256,
                         license=LICENSE, source=SOURCE, architecture=architecture)


_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
_CLIP = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
_TEXT = {"tokenizer": "TokenizersBackend", "padding_side": "right", "pooling": "mean"}
# The sha256 values hash the seeded initial state dict: they change only when torch, timm or
# transformers change how these architectures initialise (test_bases then names the new value).
TINY_IMAGE = _tiny("image", 99196, 256, "test_efficientnet",
                   "7a8aba0198c1eeff18b31e47c4f237d1699cf0d5796a92fdd9acf51677ffecb3",
                   **_IMAGENET, input_size=[3, 64, 64], crop_pct=0.95, crop_mode="center", interpolation="bicubic")
TINY_TEXT = _tiny("text", 41952, 32, "BertModel", "2695f80935eba16cfc9b728885b22d90fefd37c86bb02ad56df70d5e414c23b2",
                  **_TEXT, vocab_size=261, max_length=128, lowercase=False)
TINY_LLM = _tiny("causal_lm", 26880, 32, "LlamaForCausalLM",
                 "87986814f7d24d4b94d7eded62d9e4d14c079a541b3965ae6c23e827eb4a364d",
                 **_TEXT, vocab_size=259, max_length=256, pad_token="<|im_end|>", eos_token="<|im_end|>",
                 chat_template=True)
TINY_CLIP = _tiny("image", 24448, 16, "CLIPModel", "650cbb61ca2d7cc0cc2504c84d80f22ae21d684efccc9e8d23fe8cddf6af8cc3",
                  **_CLIP, input_size=[3, 32, 32], crop_pct=1.0, crop_mode="center", interpolation="bicubic",
                  text_tokenizer="TokenizersBackend", text_max_length=64, text_padding="longest")


@register_base("tiny-image", cfg=TINY_IMAGE, hidden=True)
def tiny_image(pretrained: bool = True) -> TimmImageBackbone:
    """timm test_efficientnet at 64x64 input (256-d features), random init."""
    import timm

    from .image import TimmImageBackbone

    model = _seeded(lambda: timm.create_model("test_efficientnet", pretrained=False))
    return _stamp(TimmImageBackbone(model, name="tiny-image", source=SOURCE, sha256="", input_size=64))


@register_base("tiny-text", cfg=TINY_TEXT, hidden=True)
def tiny_text(pretrained: bool = True) -> HFTextBackbone:
    """2-layer BERT, hidden 32, byte-level tokenizer, random init."""
    from transformers import BertConfig, BertModel

    from .text import HFTextBackbone

    tokenizer = byte_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        template=("[CLS]", "[SEP]"),
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, pad_token_id=0, architectures=["BertModel"],
    )
    model = _seeded(lambda: BertModel(config, add_pooling_layer=False).eval())
    return _stamp(HFTextBackbone(model, tokenizer, name="tiny-text", source=SOURCE, sha256=""))


@register_base("tiny-llm", cfg=TINY_LLM, hidden=True)
def tiny_llm(pretrained: bool = True) -> CausalLMBackbone:
    """2-layer Llama, hidden 32, tied embeddings, byte-level ChatML tokenizer, random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .causal_lm import CausalLMBackbone

    tokenizer = byte_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, architectures=["LlamaForCausalLM"],
    )
    lm = _seeded(lambda: LlamaForCausalLM(config).eval())
    return _stamp(CausalLMBackbone(lm, tokenizer, name="tiny-llm", source=SOURCE, sha256=""))


@register_base("tiny-clip", cfg=TINY_CLIP, hidden=True)
def tiny_clip(pretrained: bool = True) -> ClipBackbone:
    """CLIP: 2-layer ViT (32 px, patch 8) + 2-layer text tower, hidden 32, 16-d projection, random init."""
    from transformers import CLIPConfig, CLIPModel

    from .clip import ClipBackbone
    from .weights import state_dict_sha256

    tokenizer = byte_tokenizer(
        ["<|startoftext|>", "<|endoftext|>"],
        template=("<|startoftext|>", "<|endoftext|>"),
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    config = CLIPConfig(
        # eos id 1: CLIP pools the text at the first eos (id 2 would select its legacy argmax pooling)
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16, architectures=["CLIPModel"],
    )
    model = _seeded(lambda: CLIPModel(config).eval())
    # Not _stamp: the backbone's state_dict is the vision tower only, and the hash must cover the text tower too.
    return ClipBackbone(model, tokenizer, name="tiny-clip", source=SOURCE, sha256=state_dict_sha256(model))
