"""Causal-LM bases: a decoder-only LM whose features are its mean-pooled last hidden state.

The full LM (with `lm_head`) is kept as `self.lm` so instruction tuning can train it as a
generator; classification methods only use `forward`, which never runs the LM head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .backbone import Backbone, BaseInfo
from .structure import leftover_modules, suffix_targets
from .text import mean_pool
from .weights import quiet_weight_loading, weights_sha256


class CausalLMBackbone(Backbone):
    """AutoModelForCausalLM + tokenizer; `forward(**batch)` -> mean-pooled [B, hidden_size].

    Padding is on the right with `pad = eos` when the tokenizer has no pad token, so the
    attention mask alone decides which positions are pooled.

    >>> base = load_causal_lm_folder("path/to/folder", name="my-lm")
    >>> base(**base.collate(["hello", "a longer text"])).shape
    torch.Size([2, 576])
    """

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        *,
        name: str,
        source: str,
        sha256: str,
        max_length: int = 256,
    ) -> None:
        super().__init__()
        self.lm = lm
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_length = max_length
        config = lm.config
        self.info = BaseInfo(
            name=name,
            kind="causal_lm",
            params=sum(p.numel() for p in lm.parameters()),  # a tied lm_head counts once
            source=source,
            sha256=sha256,
            feature_dim=int(config.hidden_size),
            preprocessing={
                "tokenizer": type(tokenizer).__name__,
                "vocab_size": len(tokenizer),
                "max_length": max_length,
                "padding_side": "right",
                "pad_token": tokenizer.pad_token,
                "eos_token": tokenizer.eos_token,
                "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                "pooling": "mean",
            },
            architecture=(config.architectures or [type(lm).__name__])[0],
        )

    def collate(self, items: Sequence[str], train: bool = False) -> dict[str, torch.Tensor]:
        """Strings -> {input_ids, attention_mask}, right-padded to the longest item."""
        enc = self.tokenizer(
            list(items), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        # The decoder body alone (after the final norm): skips the [B, T, vocab] logits.
        body = self.lm.base_model
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def feature_layers(self) -> list[str]:
        """The mean-pooled output of every decoder layer but the last (`layer.0` ..), then "final"
        (the last layer after the final norm)."""
        return [f"layer.{i}" for i in range(len(_decoder_layers(self.lm)) - 1)] + ["final"]

    def layer_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 output_hidden_states=True, **extra)
        hidden = out.hidden_states[1:-1]  # [0]: embeddings; [-1]: the last layer after the final norm
        feats = {f"layer.{i}": mean_pool(h, attention_mask) for i, h in enumerate(hidden)}
        feats["final"] = mean_pool(out.last_hidden_state, attention_mask)
        return feats

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """embed_tokens, layer.0 .. layer.N-1, norm (+ lm_head when it is not tied).

        A tied lm_head shares the embedding matrix, so it is already in "embeddings" and is not
        listed again; an untied one sits in the last block: features do not use it, but
        instruction tuning does, and every parameter must belong to exactly one block.
        """
        embed = self.lm.get_input_embeddings()
        layers = _decoder_layers(self.lm)
        out: list[tuple[str, nn.Module]] = [("embeddings", embed)]
        out += [(f"layer.{i}", layer) for i, layer in enumerate(layers)]
        rest = leftover_modules(self.lm, [embed, *layers])
        if len(rest):
            out.append(("norm", rest))
        return out

    def lora_target_modules(self) -> list[str]:
        """The projections of each attention module (Llama: q_proj, k_proj, v_proj, o_proj)."""
        modules = dict(self.lm.named_modules())

        def in_attention(name: str, m: nn.Module) -> bool:
            parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
            is_proj = isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # GPT-2 style
            return is_proj and parent is not None and "Attention" in type(parent).__name__

        return suffix_targets(self.lm, in_attention)


def _decoder_layers(lm: nn.Module) -> nn.ModuleList:
    layers = getattr(lm.base_model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(lm).__name__} has no ModuleList of decoder layers")
    return max(lists, key=len)


def load_causal_lm_folder(
    folder: str | Path,
    *,
    name: str,
    source: str | None = None,
    sha256: str | None = None,
    pretrained: bool = True,
    **kwargs: Any,
) -> CausalLMBackbone:
    """A local transformers causal-LM folder (config.json, safetensors, tokenizer) as a base.

    `pretrained=False` keeps the architecture and tokenizer but initialises the weights randomly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if pretrained:
        with quiet_weight_loading():
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    return CausalLMBackbone(
        lm.eval(),
        AutoTokenizer.from_pretrained(folder),
        name=name,
        source=(source or str(folder)) if pretrained else "random init",
        sha256=sha256 or weights_sha256(folder),
        **kwargs,
    )


def load_gguf(gguf: str | Path, *, name: str, source: str | None = None, pretrained: bool = True) -> CausalLMBackbone:
    """A GGUF checkpoint as a base, through a dequantised float32 copy cached on first use."""
    from .gguf_cache import dequantised_dir

    gguf = Path(gguf)
    folder, sha = dequantised_dir(gguf, name if "/" not in name else None)
    return load_causal_lm_folder(folder, name=name, source=source or str(gguf), sha256=sha, pretrained=pretrained)
