"""Text bases: a transformers encoder with sentence-transformers mean pooling.

The registered text base, `minilm-l6`, lives in `minilm.py` (registering modules stay torch-free).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, BaseInfo
from .minilm import minilm_dir  # noqa: F401  (kept importable from here)
from .structure import leftover_modules, suffix_targets
from .weights import quiet_weight_loading, weights_sha256


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors over real tokens: [B, T, D], [B, T] -> [B, D].

    Written exactly as sentence-transformers' Pooling(mean) so embeddings match it.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)


class HFTextBackbone(Backbone):
    """A transformers encoder + its tokenizer; `forward(**batch)` -> mean-pooled [B, hidden].

    `normalize=True` L2-normalises the features (what sentence-transformers returns for
    all-MiniLM); training uses the raw mean (default) so heads see the norm as well.

    >>> base = load_text_folder(minilm_dir(), name="minilm-l6")
    >>> base(**base.collate(["a sentence"])).shape
    torch.Size([1, 384])
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str,
        source: str,
        sha256: str,
        max_length: int = 128,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalize = normalize
        config = model.config
        self.info = BaseInfo(
            name=name,
            kind="text",
            params=sum(p.numel() for p in model.parameters()),
            source=source,
            sha256=sha256,
            feature_dim=int(config.hidden_size),
            preprocessing={
                "tokenizer": type(tokenizer).__name__,
                "vocab_size": len(tokenizer),
                "max_length": max_length,
                "padding_side": tokenizer.padding_side,
                "lowercase": bool(getattr(tokenizer, "do_lower_case", False)),
                "pooling": "mean",
            },
            architecture=(config.architectures or [type(model).__name__])[0],
        )

    def collate(self, items: Sequence[str], train: bool = False) -> dict[str, torch.Tensor]:
        """Strings -> {input_ids, attention_mask[, token_type_ids]}, padded to the longest item."""
        enc = self.tokenizer(
            list(items), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(enc)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)  # [B, D]
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def feature_layers(self) -> list[str]:
        """The mean-pooled output of every transformer layer but the last (`layer.0` ..), then "final"."""
        return [f"layer.{i}" for i in range(len(_layer_list(self.model)) - 1)] + ["final"]

    def layer_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        hidden = out.hidden_states[1:]  # [0] is the embedding output
        feats = {f"layer.{i}": mean_pool(h, attention_mask) for i, h in enumerate(hidden[:-1])}
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        feats["final"] = F.normalize(pooled, p=2, dim=1) if self.normalize else pooled
        return feats

    def blocks(self) -> list[tuple[str, nn.Module]]:
        embeddings = self.model.get_input_embeddings()
        embeddings = getattr(self.model, "embeddings", embeddings)  # BERT: word+position+type+LN
        layers = _layer_list(self.model)
        out: list[tuple[str, nn.Module]] = [("embeddings", embeddings)]
        out += [(f"layer.{i}", layer) for i, layer in enumerate(layers)]
        rest = leftover_modules(self.model, [embeddings, *layers])
        if len(rest):  # a pooler or final norm rides with the top layer
            name, last = out[-1]
            out[-1] = (name, nn.ModuleList([last, *rest]))
        return out

    def lora_target_modules(self) -> list[str]:
        """Every Linear in the encoder (BERT: query, key, value, dense)."""
        return suffix_targets(self.model, lambda n, m: isinstance(m, nn.Linear))


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of layers")
    return max(lists, key=len)


def load_text_folder(
    folder: str | Path, *, name: str, source: str | None = None, pretrained: bool = True, **kwargs: Any
) -> HFTextBackbone:
    """A local transformers encoder folder (config.json, weights, tokenizer) as a text base.

    `pretrained=False` keeps the architecture and tokenizer but initialises the weights randomly.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    # Mean pooling never uses BERT's pooler. It is built only when the checkpoint has its
    # weights (otherwise transformers reports them as missing) and dropped after loading
    # (so transformers does not report them as unexpected): either way it stays out of
    # blocks() and the parameter count.
    extra = {} if _has_pooler_weights(folder) else {"add_pooling_layer": False}

    def build(**kw: Any) -> nn.Module:
        if pretrained:
            with quiet_weight_loading():
                return AutoModel.from_pretrained(folder, config=config, dtype=torch.float32, **kw)
        return AutoModel.from_config(config, dtype=torch.float32, **kw)

    try:
        model = build(**extra)
    except TypeError:  # an encoder without a pooler option
        model = build()
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    # A sentence-transformers folder says how long its inputs may be (256 for all-MiniLM-L6-v2);
    # truncating where it does keeps our embeddings identical to its own.
    st_config = folder / "sentence_bert_config.json"
    if "max_length" not in kwargs and st_config.is_file():
        kwargs["max_length"] = int(json.loads(st_config.read_text()).get("max_seq_length", 128))
    return HFTextBackbone(
        model.eval(),
        AutoTokenizer.from_pretrained(folder),
        name=name,
        source=(source or str(folder)) if pretrained else "random init",
        sha256=weights_sha256(folder),
        **kwargs,
    )


def _has_pooler_weights(folder: Path) -> bool:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return True  # pickled .bin checkpoints cannot be listed without loading them
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if any(k.startswith("pooler.") or ".pooler." in k for k in f.keys()):
                return True
    return False
