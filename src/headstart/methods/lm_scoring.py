"""Classify with a causal LM by the log-likelihood of each label's answer (never by parsing generated text).

The prompt is a chat rendered by `llm.tokenize.render_chat` (the tokenizer's own template, ChatML when it
has none: the same text SFT trains on and generation prompts with), demonstrations as earlier turns:

    <|im_start|>user
    {instruction}
    - {label line 1}
    - ...
    Text: {demonstration 1}<|im_end|>
    <|im_start|>assistant
    {answer of demonstration 1}<|im_end|>
    <|im_start|>user
    Text: {demonstration 2}<|im_end|>          (later turns: the text alone, no repeated label list)
    ...
    <|im_start|>user
    Text: {input}<|im_end|>                     (zero-shot: the first and only user turn)
    <|im_start|>assistant
    {answer c}<|im_end|>                        <- scored: log p(answer tokens + end of turn)

Everything before the final `Text: ` is the same for every input: it runs through the LM once and its
KV cache is reused. Per batch of inputs, one forward on that cache runs each input (`Text: x` + the
assistant opener) followed by all the answers, laid out as a tree: a 4D attention mask lets every answer
see the prefix and its own input but no other answer. So an input's tokens are computed once, not once per
class, and no cache is copied per class. The pieces are tokenised separately and concatenated
(prefix ids | input ids | answer ids): that is the sequence scored, with or without the cache.
"""
from __future__ import annotations

import inspect
import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..core.errors import BundleError, ConfigError
from ..llm.tokenize import render_chat
from .labels import readable

CONTENT_FREE = ["N/A", "", "[MASK]"]
"""Inputs with no content (Zhao et al. 2021): what the prompt alone makes the LM favour."""
PROMPT_FILE = "prompt.json"
_INPUT, _ANSWER = "@@HEADSTART-INPUT@@", "@@HEADSTART-ANSWER@@"


@dataclass
class PromptSpec:
    """Everything that defines the prompt: JSON-serialisable, stored as the bundle's prompt.json."""

    classes: list[str]
    """Label names, in class-index order."""
    answers: list[str]
    """Per class, the answer string the LM is scored on."""
    label_lines: list[str]
    """Per class, how the label is listed in the prompt (`NUM: a question asking for a number`)."""
    instruction: str
    """The task, before the label list."""
    examples: list[tuple[str, int]] = field(default_factory=list)
    """In-context demonstrations (text, class index), in prompt order; [] for zero-shot."""
    calibrate: bool = True
    """Contextual calibration (Zhao et al. 2021): subtract what content-free inputs score."""
    max_input_chars: int = 1000
    """Each input and demonstration text is cut to this many characters."""

    def __post_init__(self) -> None:
        c = len(self.classes)
        if c < 2 or len(self.answers) != c or len(self.label_lines) != c:
            raise ConfigError(f"a prompt needs >= 2 classes with one answer and one label line each "
                              f"(classes {c}, answers {len(self.answers)}, label lines {len(self.label_lines)})")
        if len(set(self.answers)) != c or not all(a.strip() for a in self.answers):
            raise ConfigError(f"answers must be distinct and non-empty, got {self.answers}")
        self.examples = [(str(t), int(y)) for t, y in self.examples]
        if any(not 0 <= y < c for _, y in self.examples):
            raise ConfigError("an example's class index is out of range")
        if self.max_input_chars < 1:
            raise ConfigError(f"max_input_chars must be >= 1, got {self.max_input_chars}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["examples"] = [[t, y] for t, y in self.examples]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PromptSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_prompt_spec(classes: list[str], descriptions: dict[str, str], examples: list[tuple[str, int]],
                        instruction: str | None, calibrate: bool, seed: int = 0,
                        answer_words: dict[str, str] | None = None) -> PromptSpec:
    """The prompt `incontext` and `zeroshot` use: readable label names as answers (all-caps codes lower-cased:
    a small LM splits `ABBR` into pieces it never saw as a word) unless `answer_words` names another word for
    a label, `answer: description` lines, demonstrations interleaved by class.

    >>> default_prompt_spec(["HUM", "NUM"], {"NUM": "a number"}, [], None, True).label_lines
    ['hum', 'num: a number']
    >>> default_prompt_spec(["ham", "spam"], {}, [], None, True, answer_words={"ham": "normal"}).answers
    ['normal', 'spam']
    """
    answers = [readable(c).lower() if readable(c).isupper() else readable(c) for c in classes]
    if len(set(answers)) < len(answers):  # `NUM` and `num` both labels: keep the names as they are
        answers = [readable(c) for c in classes]
    answers = [(answer_words or {}).get(c) or a for a, c in zip(answers, classes)]
    lines = [f"{a}: {descriptions[c]}" if descriptions.get(c) else a for a, c in zip(answers, classes)]
    instruction = instruction or ("Classify the text into one of these categories. "
                                  "Reply with the category name only.")
    return PromptSpec(list(classes), answers, lines, instruction, interleave_by_class(examples, seed), calibrate)


def interleave_by_class(examples: list[tuple[str, int]], seed: int = 0) -> list[tuple[str, int]]:
    """Round-robin over classes, in a seeded random class order per round, so the last demonstration
    (the one LMs favour most: recency bias) is not always the same class."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for ex in examples:
        by_class.setdefault(ex[1], []).append(ex)
    rng, out = random.Random(seed), []
    for r in range(max((len(v) for v in by_class.values()), default=0)):
        round_ = [v[r] for v in by_class.values() if r < len(v)]
        rng.shuffle(round_)
        out += round_
    return out


class LabelScoringModel(nn.Module):
    """Causal LM + prompt: logits[b, c] = log p(answer_c + end-of-turn | prompt(x_b)) (minus the calibration).

    >>> model = LabelScoringModel(load_base("smollm2-135m"), default_prompt_spec(["HUM", "NUM"], {}, [], None, True))
    >>> model.calibrate_()
    >>> model(**model.collate(["How far is it from Denver to Aspen ?"])).softmax(-1)  # [1, 2]
    """

    def __init__(self, backbone, spec: PromptSpec, length_norm: bool = False, batch_size: int = 8):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.spec, self.length_norm, self.batch_size = spec, length_norm, batch_size
        self.register_buffer("calibration", torch.zeros(len(spec.classes)))
        prefix, self._input_tail, end_ids = self._split_template()
        self.prefix_ids: list[int] = self._encode(prefix)
        self._prefix_text = prefix
        # Each answer is scored with the end-of-turn token, so "NUM" and "NUMBER" are told apart.
        self.answer_ids: list[list[int]] = [self._encode(a) + end_ids for a in spec.answers]
        if len({tuple(a) for a in self.answer_ids}) < len(self.answer_ids):
            raise ConfigError(f"two answers tokenise identically: {spec.answers}")
        attention = getattr(backbone.lm.config, "_attn_implementation", None) or "eager"
        if attention not in ("eager", "sdpa"):  # the answer tree needs a custom 4D attention mask
            raise ConfigError(f"label scoring needs eager or sdpa attention; {backbone.info.name!r} uses {attention}")
        self._max_positions = getattr(backbone.lm.config, "max_position_embeddings", None)
        self._check_length(len(self.prefix_ids) + max(map(len, self.answer_ids)))
        self._prefix_kv: tuple | None = None  # (device, dtype, [(k, v)] per layer): computed on first use, not saved

    @property
    def base(self):
        """The causal-LM backbone."""
        return self.backbone

    @property
    def prompt_tokens(self) -> int:
        """Length of the shared prompt prefix (instruction, labels, demonstrations), in tokens."""
        return len(self.prefix_ids)

    # ---- prompt ------------------------------------------------------------------------------
    def _messages(self, final_user: str, final_answer: str) -> list[dict[str, str]]:
        spec = self.spec
        header = spec.instruction + "\n" + "".join(f"- {line}\n" for line in spec.label_lines)
        turns = [(self._text(t), spec.answers[y]) for t, y in spec.examples] + [(final_user, final_answer)]
        msgs = []
        for i, (user, answer) in enumerate(turns):
            msgs += [{"role": "user", "content": (header if i == 0 else "") + user},
                     {"role": "assistant", "content": answer}]
        return msgs

    def _split_template(self) -> tuple[str, str, list[int]]:
        """(shared prefix, what follows an input up to the answer, end-of-turn ids) from the rendered chat."""
        tok = self.backbone.tokenizer
        # The renderer SFT trains with and generation prompts with (ChatML when the tokenizer has no template).
        text = render_chat(tok, self._messages(_INPUT, _ANSWER))
        if text.count(_INPUT) != 1 or text.count(_ANSWER) != 1 or text.index(_INPUT) > text.index(_ANSWER):
            raise ConfigError(f"the chat template of {self.backbone.info.name!r} cannot be split into "
                              "prompt and answer")
        prefix, rest = text.split(_INPUT)
        input_tail, tail = rest.split(_ANSWER)
        tail_ids = self._encode(tail)
        return prefix, input_tail, tail_ids[:1] if tail_ids else [tok.eos_token_id]

    def _encode(self, text):
        """Token ids of a string (or list of strings) as is: the template already holds any BOS."""
        return self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text(self, text: str) -> str:
        return "Text: " + str(text)[: self.spec.max_input_chars]

    def prompt_text(self, text: str) -> str:
        """The whole prompt for one input, up to where the answer starts (to inspect it)."""
        return self._prefix_text + self._text(text) + self._input_tail

    def _check_length(self, n: int) -> None:
        if self._max_positions and n > self._max_positions:
            raise ConfigError(f"the prompt needs {n} tokens but {self.backbone.info.name!r} handles at most "
                              f"{self._max_positions}: use fewer examples per class or shorter texts "
                              f"(max_input_chars={self.spec.max_input_chars})")

    # ---- scoring -----------------------------------------------------------------------------
    def collate(self, items: Sequence[str], train: bool = False) -> dict[str, torch.Tensor]:
        """Texts -> {input_ids, attention_mask}: each input's part of the prompt, right-padded."""
        ids = self._encode([self._text(x) + self._input_tail for x in items])
        width = max(map(len, ids), default=0)
        pad = self.backbone.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids], dtype=torch.long),
                "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        """[B, C] label scores: summed (or, with length_norm, mean) answer-token log-probs + calibration."""
        with torch.no_grad():
            out = [self._score(input_ids[i:i + self.batch_size], attention_mask[i:i + self.batch_size])
                   for i in range(0, len(input_ids), self.batch_size)]
            scores = torch.cat(out) if out else torch.zeros(0, len(self.spec.classes))
            return scores + self.calibration.to(scores.device)

    def calibrate_(self) -> None:
        """Store -log(mean p(class | content-free input)) as the calibration (no-op when spec.calibrate is off).

        As in the paper, the class probabilities (normalised over the label set) of the content-free inputs
        are averaged; a calibrated score is then raw - log p_cf, a per-class constant.
        """
        if not self.spec.calibrate:
            return
        self.calibration.zero_()
        p = self(**self.collate(CONTENT_FREE)).log_softmax(-1).exp().mean(0)
        self.calibration.copy_(-p.log())

    def _score(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lm = self.backbone.lm.eval()
        param = next(lm.parameters())
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width].to(param.device), mask[:, :width].to(param.device)  # [B, L]
        tree_ids, seg, offset, target = (t.to(param.device) for t in self._tree)  # [S] each
        b, p, s, c = len(ids), len(self.prefix_ids), len(tree_ids), len(self.answer_ids)
        self._check_length(p + width + max(map(len, self.answer_ids)))
        lengths = mask.sum(1)  # [B]

        # One forward per batch on the cached prefix: queries = the inputs | every answer (less its last token).
        seq = torch.cat([ids, tree_ids.expand(b, s)], 1)  # [B, L+S]
        positions = torch.cat([p + torch.arange(width, device=ids.device).expand(b, width),
                               p + lengths[:, None] + offset], 1)  # an answer continues right after its input
        allowed = self._attention(mask, seg, p)  # [B, L+S, P+L+S]
        bias = torch.zeros(allowed.shape, dtype=param.dtype, device=ids.device)
        bias = bias.masked_fill(~allowed, torch.finfo(param.dtype).min)[:, None]  # additive: eager and sdpa take it
        cache = self._cache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self._prefix_states()])
        hidden = self._run(lm.base_model, seq, bias, positions, cache)  # [B, L+S, H]

        head = lm.get_output_embeddings()
        # An input's last token predicts every answer's first token: one vocabulary softmax per input, not per class.
        first = self._logits(head, hidden[torch.arange(b, device=ids.device), lengths - 1]).log_softmax(-1)  # [B, V]
        scores = first[:, [a[0] for a in self.answer_ids]]  # [B, C]
        # Answer position i predicts target[i], the next token of answer seg[i].
        later = self._logits(head, hidden[:, width:]).log_softmax(-1).gather(-1, target.expand(b, s)[..., None])
        scores = scores + later.squeeze(-1) @ nn.functional.one_hot(seg, c).to(later.dtype)  # sum per answer
        if self.length_norm:
            scores = scores / torch.tensor([len(a) for a in self.answer_ids], device=scores.device)
        return scores.float().cpu()

    @staticmethod
    def _attention(mask: torch.Tensor, seg: torch.Tensor, p: int) -> torch.Tensor:
        """Who sees whom [B, L+S, P+L+S]: the inputs are causal (padding hidden); each answer sees the prefix,
        its own input and its own earlier tokens, never another answer (a tree: the input is shared)."""
        b, width = mask.shape
        s, dev = len(seg), mask.device
        valid = mask.bool()[:, None, :]  # [B, 1, L]
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        own = (seg[:, None] == seg[None, :]) & torch.ones(s, s, dtype=torch.bool, device=dev).tril()
        rows_in = torch.cat([causal[None] & valid, torch.zeros(b, width, s, dtype=torch.bool, device=dev)], 2)
        rows_ans = torch.cat([valid.expand(b, s, width), own.expand(b, s, s)], 2)
        allowed = torch.cat([rows_in, rows_ans], 1)  # [B, L+S, L+S]
        return torch.cat([torch.ones(b, width + s, p, dtype=torch.bool, device=dev), allowed], 2)

    def _logits(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()
        cap = getattr(self.backbone.lm.config, "final_logit_softcapping", None)  # Gemma-2 style, as its forward does
        return torch.tanh(logits / cap) * cap if cap else logits

    def _run(self, body, ids, mask, positions, cache) -> torch.Tensor:
        kwargs = {_cache_kwarg(body): cache}
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.last_hidden_state

    def _cache(self, states: list[tuple[torch.Tensor, torch.Tensor]]):
        """A fresh DynamicCache holding these per-layer (keys, values): the forward grows it, so never reuse one."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.backbone.lm.config)
        for i, (k, v) in enumerate(states):
            cache.update(k, v, i)
        return cache

    def _prefix_states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [1, heads, P, d] of the shared prompt; recomputed if the LM moved."""
        param = next(self.backbone.lm.parameters())
        if self._prefix_kv is None or self._prefix_kv[:2] != (param.device, param.dtype):
            ids = torch.tensor([self.prefix_ids], device=param.device)
            cache = self._cache([])
            with torch.no_grad():
                self._run(self.backbone.lm.base_model, ids, torch.ones_like(ids),
                          torch.arange(ids.shape[1], device=ids.device)[None], cache)
            self._prefix_kv = (param.device, param.dtype, [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix_kv[2]

    @property
    def _tree(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every answer but its last token, one after another [S]: ids, answer index, offset in it, next token."""
        rows = [(a[j], c, j, a[j + 1]) for c, a in enumerate(self.answer_ids) for j in range(len(a) - 1)]
        return tuple(torch.tensor(col) for col in zip(*rows))  # type: ignore[return-value]


def _cache_kwarg(body: nn.Module) -> str:
    """transformers 5 calls the cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def scoring_state(model: LabelScoringModel) -> dict[str, torch.Tensor]:
    """What a label-scoring bundle stores in trained.safetensors: the calibration (the LM is the base's)."""
    return {"calibration": model.calibration.detach()}


def save_prompt(model: LabelScoringModel, folder: Path) -> None:
    """Write the prompt (PromptSpec + length_norm) as the bundle's prompt.json."""
    prompt = {**model.spec.to_json(), "length_norm": model.length_norm}
    (Path(folder) / PROMPT_FILE).write_text(json.dumps(prompt, indent=2, ensure_ascii=False), encoding="utf-8")


def load_scoring_model(backbone, state: dict[str, torch.Tensor], folder: Path, batch_size: int = 8) -> LabelScoringModel:
    """Rebuild the model from prompt.json (JSON only: no code from the bundle runs) and the calibration."""
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: incomplete bundle (no {PROMPT_FILE})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BundleError(f"{path}: unreadable prompt ({e})") from None
    if not isinstance(d, dict):
        raise BundleError(f"{path}: the prompt is not a JSON object")
    try:
        spec = PromptSpec.from_json(d)
    except (ConfigError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: invalid prompt ({e})") from None
    model = LabelScoringModel(backbone, spec, bool(d.get("length_norm", False)), batch_size)
    if "calibration" not in state or state["calibration"].shape != model.calibration.shape:
        raise BundleError(f"{folder}: the stored calibration does not match the {len(model.spec.classes)} labels")
    model.calibration.copy_(state["calibration"])
    return model.eval()


class LMScoringMixin:
    """For a Method whose model is always a LabelScoringModel (`incontext`): the bundle rules above as methods."""

    def trained_state(self, model: LabelScoringModel) -> dict[str, torch.Tensor]:
        return scoring_state(model)

    def save_artifacts(self, model: LabelScoringModel, folder: Path, base_name: str) -> None:
        save_prompt(model, folder)

    def restore_scoring(self, backbone, state: dict[str, torch.Tensor], folder: Path) -> LabelScoringModel:
        return load_scoring_model(backbone, state, folder, getattr(getattr(self, "config", None), "batch_size", 8))
