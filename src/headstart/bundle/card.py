"""The bundle's README.md model card, from its manifest."""
from __future__ import annotations

from typing import Any


def model_card(m: dict[str, Any]) -> str:
    metrics = m.get("metrics", {})
    base = m["base"]
    data = m.get("data", {})
    lines = [
        f"# {m['method']['name']} specialist on {base['name']}",
        "",
        f"A headstart specialist: `{m['method']['name']}` on the {base['kind']} base `{base['name']}` "
        f"({base['params'] / 1e6:.1f}M parameters, weights sha256 `{base['sha256'][:16]}...`).",
        "",
        "## Use",
        "```python",
        "import headstart",
        f"spec = headstart.load(\"{m.get('bundle_name', 'path/to/this/folder')}\")",
        "spec.predict([...])",
        "```",
        "",
        "## Labels",
        ", ".join(f"`{c}`" for c in m["classes"]),
        "",
        f"## Metrics ({metrics.get('split', 'evaluation')} split, {metrics.get('examples', '?')} examples)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("accuracy", "macro_f1", "trainable_params", "trainable_pct", "wall_s", "examples_per_s",
                "peak_mem_mb", "skipped"):
        if key in metrics:
            v = metrics[key]
            lines.append(f"| {key} | {v:.4f} |" if isinstance(v, float) else f"| {key} | {v} |")
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
        " weights" + ("; `adapter/`: the PEFT LoRA adapter" if m["method"]["name"] in ("lora", "setfit")
                      and m["method"]["config"].get("lora", True) else "")
        + ("; `prompt.json`: the prompt the LM scores labels with" if m["method"]["name"] in ("incontext", "zeroshot")
           and m["method"]["config"].get("scoring", "likelihood") == "likelihood" else "") + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
        "",
    ]
    return "\n".join(lines)
