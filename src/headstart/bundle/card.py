"""The bundle's README.md model card, from its manifest: Hugging Face YAML front matter + a page.

The front matter is what the hub indexes (https://huggingface.co/docs/hub/model-cards):
`base_model`, `base_model_relation` (adapter / finetune), `library_name`, `pipeline_tag`, the
base's `license`, and the metrics as `model-index`. It is written with `yaml.safe_dump`, so a
label or path with odd characters cannot break it.
"""
from __future__ import annotations

import math
from typing import Any

PIPELINE_TAGS = {"image": "image-classification", "text": "text-classification", "generator": "text-generation"}
CLASSIFIER_METRICS = (("accuracy", "accuracy", "accuracy"), ("macro_f1", "f1", "macro-F1"))
GENERATOR_METRICS = (("eval_loss", "loss", "held-out loss per answer token"),
                     ("eval_perplexity", "perplexity", "held-out perplexity"),
                     ("reward_accuracy", "accuracy", "held-out reward accuracy"),
                     ("eval_dpo_loss", "loss", "held-out DPO loss"))


def model_card(m: dict[str, Any], relation: str | None = None) -> str:
    """README.md text for a bundle manifest; `relation` overrides the guessed `base_model_relation`."""
    body = _generator_body(m) if m.get("kind") == "generator" else _classifier_body(m)
    return "---\n" + front_matter(m, relation) + "---\n\n" + body


def front_matter(m: dict[str, Any], relation: str | None = None) -> str:
    """The YAML block (without the `---` fences)."""
    import yaml

    generator = m.get("kind") == "generator"
    has_adapter = bool(m.get("adapters"))
    relation = relation or ("adapter" if generator or has_adapter else "finetune")
    # A classifier on a causal LM (probe on SmolLM2's features) still classifies text.
    pipeline = PIPELINE_TAGS["generator" if generator else "image" if m["base"]["kind"] == "image" else "text"]
    meta: dict[str, Any] = {"base_model": base_model_id(m["base"]), "base_model_relation": relation,
                            "library_name": "peft" if has_adapter else "headstart"}
    meta["pipeline_tag"] = pipeline
    licence = base_licence(m["base"])
    if licence:
        meta["license"] = licence
    meta["tags"] = ["headstart", m["method"]["name"], m.get("task", "classify")]
    results = _model_index_metrics(m, GENERATOR_METRICS if generator else CLASSIFIER_METRICS)
    if results:
        data = m.get("data", {})
        source = str(data.get("eval") or data.get("source") or "unknown")
        dataset = {"name": source, "type": source}
        if m.get("metrics", {}).get("split") and not generator:
            dataset["split"] = str(m["metrics"]["split"])
        meta["model-index"] = [{"name": str(m.get("bundle_name") or f"{m['method']['name']} on {m['base']['name']}"),
                                "results": [{"task": {"type": pipeline}, "dataset": dataset,
                                             "metrics": results}]}]
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


def base_model_id(base: dict[str, Any]) -> str:
    """The hub id of the base when it has one (the registry's static facts, or an `hf-hub:` source),
    else its registry name or path."""
    source = str(base.get("source", ""))
    if source.startswith("hf-hub:"):
        return source[len("hf-hub:"):]
    hub_id = getattr(_registered(base), "hf_hub_id", None)
    return hub_id if isinstance(hub_id, str) and hub_id else str(base["name"])


def base_licence(base: dict[str, Any]) -> str | None:
    """The base's licence: the manifest's record, else the registry's static facts, else unknown."""
    if isinstance(base.get("license"), str) and base["license"]:
        return base["license"]
    licence = getattr(_registered(base), "license", None)
    return licence if isinstance(licence, str) and licence else None


def _registered(base: dict[str, Any]):
    """The registry's entry for the base (static facts only: nothing is built), or None."""
    from ..bases.registry import get_base_spec

    try:
        return get_base_spec(str(base["name"]))
    except Exception:  # the registry cannot even be imported here: a card with fewer facts beats none
        return None


def _model_index_metrics(m: dict[str, Any], keys) -> list[dict[str, Any]]:
    metrics = m.get("metrics", {})
    out = []
    for key, kind, name in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append({"type": kind, "name": name, "value": round(float(value), 6)})
    return out


def _classifier_body(m: dict[str, Any]) -> str:
    metrics = m.get("metrics", {})
    base = m["base"]
    data = m.get("data", {})
    params = base.get("params")
    size = f"{params / 1e6:.1f}M parameters, " if isinstance(params, (int, float)) else ""
    lines = [
        f"# {m['method']['name']} specialist on {base['name']}",
        "",
        f"A headstart specialist: `{m['method']['name']}` on the {base['kind']} base `{base['name']}` "
        f"({size}weights sha256 `{base['sha256'][:16]}...`).",
        "",
        "## Use",
        "```python",
        "import headstart",
        f"spec = headstart.load(\"{m.get('bundle_name', 'path/to/this/folder')}\")",
        "spec.predict([...])",
        "```",
        "",
        "## Labels",
        ", ".join(f"`{c}`" for c in m.get("classes", [])),
        "",
        f"## Metrics ({metrics.get('split', 'evaluation')} split, {metrics.get('examples', '?')} examples)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += _metric_rows(metrics, ("accuracy", "macro_f1", "trainable_params", "trainable_pct", "wall_s",
                                    "examples_per_s", "peak_mem_mb", "skipped"))
    lines += [
        "",
        "## Training",
        f"- data: `{data.get('source', '?')}`, {data.get('train_examples', '?')} training examples"
        + (f", {data['sampling']}" if data.get("sampling") else ""),
        f"- method config: `{m['method']['config']}`",
        *([f"- chosen by `auto`: {m['details']['auto']['why']}"] if "auto" in m.get("details", {}) else []),
        f"- seed: {m.get('seed', 0)}",
        "",
        "![learning curves](plots/learning_curves.png)" if m.get("plots", {}).get("learning_curves") else "",
        "![confusion matrix](plots/confusion_matrix.png)" if m.get("plots", {}).get("confusion_matrix") else "",
        "",
        "## Files",
        "- `manifest.json`: everything needed to rebuild the specialist; `trained.safetensors`: only the trained"
        " weights" + "".join(f"; `{folder}/`: the PEFT LoRA adapter" for folder in m.get("adapters", {}).values())
        + ("; `prompt.json`: the prompt the LM scores labels with" if m["method"]["name"] in ("incontext", "zeroshot")
           and m["method"]["config"].get("scoring", "likelihood") == "likelihood" else "") + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
        "",
    ]
    return "\n".join(lines)


def _generator_body(m: dict[str, Any]) -> str:
    metrics = m.get("metrics", {})
    lines = [f"# {m.get('bundle_name', 'headstart LM specialist')}", "",
             f"{str(m.get('task', 'sft')).upper()} of `{m['base']['name']}` with `{m['method']['name']}` "
             f"(adapter only; base weights sha256 `{m['base']['sha256'][:12]}...`).", "",
             "| metric | value |", "|---|---|"]
    lines += _metric_rows(metrics, ("eval_loss_before", "eval_loss", "eval_perplexity", "reward_accuracy_before",
                                    "reward_accuracy", "train_examples", "eval_examples", "tokens_per_s", "wall_s",
                                    "peak_mem_mb"))
    lines += ["", "Load: `headstart.load(folder)`; generate: `headstart generate FOLDER \"prompt\"`; "
              "merge: `headstart export FOLDER --merged --out DIR`.", ""]
    if m.get("data"):
        lines.append(f"Data: `{m['data'].get('source')}`.")
    return "\n".join(lines) + "\n"


def _metric_rows(metrics: dict[str, Any], keys) -> list[str]:
    rows = []
    for key in keys:
        if metrics.get(key) is not None:
            v = metrics[key]
            rows.append(f"| {key} | {v:.4f} |" if isinstance(v, float) else f"| {key} | {v} |")
    return rows
