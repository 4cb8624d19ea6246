"""What a user does with any bundle, whatever its kind: load, info, predict, evaluate, export.

Each function takes a bundle folder (or an already loaded specialist) and either works for the
bundle's kind or raises one HeadstartError line saying why not. The CLI's `info`, `predict`,
`evaluate` and `export` commands are generated from these signatures and docstrings.

    >>> from headstart.bundle import commands
    >>> commands.info("runs/trec-probe")["kind"]
    'classifier'
    >>> commands.predict("runs/trec-probe", ["Who wrote Hamlet ?"])[0]["label"]
    'HUM'
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.errors import BundleError, ConfigError
from .format import read_manifest
from .lineage import is_lineage, read_lineage, resolve_bundle
from .manifest import GENERATIVE_TASKS
from .onnx_runtime import OnnxSpecialist, is_onnx
from .specialist import BundleSpecialist


def load(folder: str | Path, base: Any = None, **options: Any) -> BundleSpecialist | OnnxSpecialist:
    """Load a bundle as the specialist its manifest's kind names: a classifier `Specialist` or a
    generator `LMSpecialist`.

    folder: the bundle folder written by `fit(..., out=folder)` (a lineage folder loads its current version).
    base: an already loaded base (a Backbone) to share with other specialists instead of loading one.
    options: `head=` (classifiers) or `adapter=` / `trainable=` (generators).

    An `.onnx` file (written by `export(..., onnx=True)`) loads as an `OnnxSpecialist`: onnxruntime, no torch.
    """
    if is_onnx(folder):
        return _load_onnx(folder, base, options)
    folder = resolve_bundle(folder)  # a lineage folder: its current version; a plain bundle: itself
    kind = read_manifest(folder)["kind"]
    if kind == "generator":
        from .generator import LMSpecialist

        return LMSpecialist.load(folder, base=base, **options)
    from .classifier import Specialist

    return Specialist.load(folder, base=base, **options)


def pipeline_task(manifest: dict[str, Any]) -> str:
    """The Hugging Face pipeline task a bundle answers, from its manifest (hub search and the server
    both speak these words): a generator -> "text-generation"; a classifier over an image base ->
    "image-classification"; over a text base -> "text-classification".

    manifest: a bundle's manifest (`format.read_manifest(folder)`; version 1 is upgraded there).

    >>> pipeline_task({"kind": "classifier", "base": {"kind": "image"}})
    'image-classification'
    >>> pipeline_task({"kind": "classifier", "base": {"kind": "text"}})
    'text-classification'
    >>> pipeline_task({"kind": "generator", "base": {"kind": "causal_lm"}})
    'text-generation'
    """
    # A v1 manifest read raw has no `kind`; its task ("sft"/"dpo") says generator, as upgrade_v1 does.
    kind = manifest.get("kind") or ("generator" if manifest.get("task") in GENERATIVE_TASKS else "classifier")
    if kind == "generator":
        return "text-generation"
    base_kind = manifest.get("base", {}).get("kind")
    if base_kind == "image":
        return "image-classification"
    if base_kind in ("text", "causal_lm"):  # a head over an LLM's features still classifies text
        return "text-classification"
    raise BundleError(f"a classifier bundle over a {base_kind!r} base has no pipeline task "
                      "(known base kinds: image, text, causal_lm)")


def info(folder: str | Path) -> dict[str, Any]:
    """What a bundle holds, without loading its base: kind, task, base, method, labels, heads,
    adapters, metrics, files, when and with what it was made.

    folder: the bundle folder (a lineage folder: its current version, and `lineage` says which), or an
        exported `.onnx` file (its contract's facts).
    """
    if is_onnx(folder):
        return _onnx_info(Path(folder))
    given = Path(folder)
    folder = resolve_bundle(given)
    m = read_manifest(folder)
    base = m["base"]
    lineage = read_lineage(given) if is_lineage(given) else None
    return {
        "bundle": str(folder), "kind": m["kind"], "task": m.get("task", "classify"),
        "format_version": m["format_version"],
        "base": {k: base.get(k) for k in ("name", "kind", "params", "sha256", "source", "license")},
        "method": {"name": m["method"]["name"], "config": m["method"]["config"]},
        "labels": m.get("classes"), "heads": {name: h["classes"] for name, h in m.get("heads", {}).items()},
        "adapters": m.get("adapters", {}), "metrics": _headline_metrics(m.get("metrics", {})),
        "parent": m.get("parent"),
        "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
        "created": m.get("created"), "headstart_version": m.get("versions", {}).get("headstart"),
        **({"lineage": {"folder": str(given), "current": lineage["current"],
                        "versions": [v["version"] for v in lineage["versions"]]}} if lineage else {}),
    }


def describe(folder: str | Path) -> str:
    """`info` as the lines `headstart info` prints.

    folder: the bundle folder.
    """
    i = info(folder)
    if i.get("format") == "onnx":
        return _describe_onnx(i)
    base, params = i["base"], i["base"]["params"]
    size = f"{params / 1e6:.1f}M params, " if isinstance(params, (int, float)) else ""
    lines = [f"bundle     {i['bundle']}",
             f"kind       {i['kind']} ({i['task']})",
             f"base       {base['name']} ({base['kind']}, {size}sha256 {base['sha256'][:16]}...)"
             + (f", licence {base['license']}" if base.get("license") else ""),
             f"method     {i['method']['name']} {_compact(i['method']['config'])}"]
    for name, classes in i["heads"].items():
        lines.append(f"labels     {', '.join(classes)}" if name == "default" else f"head {name:<6}{', '.join(classes)}")
    if i["adapters"]:
        lines.append("adapters   " + ", ".join(f"{n} ({d}/)" for n, d in i["adapters"].items()))
    if i["metrics"]:
        lines.append("metrics    " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in i["metrics"].items()))
    lines += [f"files      {', '.join(i['files'])}",
              f"created    {i['created']} with headstart {i['headstart_version']}"]
    if "lineage" in i:
        lineage = i["lineage"]
        lines.append(f"version    {lineage['current']} of {', '.join(map(str, lineage['versions']))} "
                     f"(lineage {lineage['folder']})")
    return "\n".join(lines)


def predict(bundle: str | Path | BundleSpecialist, inputs: Sequence[Any], *, top_k: int = 1,
            batch_size: int = 64, max_new_tokens: int = 128, temperature: float = 0.0,
            head: str | None = None) -> list[dict[str, Any]]:
    """Run a bundle on inputs: labels with scores (classifiers) or answers (generators).

    bundle: a bundle folder, an exported `.onnx` file, or a specialist already loaded.
    inputs: image paths or texts (classifiers), prompts (generators).
    top_k: how many labels, best first, each classifier row lists.
    batch_size: examples per forward pass (classifiers).
    max_new_tokens: the longest answer, in tokens (generators).
    temperature: 0 answers greedily; above 0 samples (generators).
    head: the head (task) to answer with, in a bundle with a head per task.
    """
    spec = _loaded(bundle, head)
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if spec.bundle_kind == "generator":
        return [{"input": str(x), "answer": spec.generate(str(x), max_new_tokens=max_new_tokens,
                                                          temperature=temperature)} for x in inputs]
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    probs = spec.predict_proba(inputs, batch_size)
    k = min(top_k, len(spec.classes))
    rows = []
    for x, p in zip(inputs, probs):
        # torch rows (a bundle) or numpy rows (an .onnx file, run without torch)
        order = p.topk(k).indices.tolist() if hasattr(p, "topk") else (-p).argsort(kind="stable")[:k].tolist()
        best = [{"label": spec.classes[i], "score": round(float(p[i]), 4)} for i in order]
        rows.append({"input": str(x), **best[0], "top": best})
    return rows


def evaluate(bundle: str | Path | BundleSpecialist, data: str | Path, split: str | None = None,
             progress: bool = False, head: str | None = None) -> dict[str, Any]:
    """Score a bundle on held-out data: accuracy, macro-F1, per-class F1 (classifiers) or loss and
    perplexity on answer tokens (generators).

    bundle: a bundle folder, an exported `.onnx` file, or a specialist already loaded.
    data: a dataset folder or table (classifiers), an instruction JSONL file (generators).
    split: which split to score (classifiers; default: test, else val).
    progress: show progress bars.
    head: the head (task) to score, in a bundle with a head per task.
    """
    return _loaded(bundle, head).evaluate(data, split, progress=progress)


def export(bundle: str | Path | BundleSpecialist, out: str | Path, merged: bool = True, onnx: bool = False,
           int8: bool = False, encoder: bool = False, head: str | None = None) -> Path:
    """Write a bundle for use without headstart: a generator's adapter merged into the float32 base
    (a plain transformers folder, or with `merged=False` the PEFT adapter folder alone); a classifier
    as one ONNX file (`onnx=True`) with its preprocessing contract `out.json` beside it.

    bundle: a bundle folder, or a specialist already loaded (saved or not).
    out: the folder to write (generators; replaced atomically when merged), or the `.onnx` file (--onnx).
    merged: merge the adapter into the base (True) or write the adapter alone (False) (generators).
    onnx: write a classifier as ONNX (LoRA merged, head included) for onnxruntime; see docs/ONNX.md.
    int8: with --onnx, quantize the weights to int8 (text bases; faster on CPU, a little less exact).
    encoder: with --onnx, write the base's embeddings instead of the head's logits.
    head: the head (task) to export, in a bundle with a head per task (--onnx).

    >>> export("runs/trec-ft", "trec.onnx", onnx=True, int8=True)
    PosixPath('trec.onnx')
    """
    if onnx:
        return _export_onnx(bundle, out, int8=int8, encoder=encoder, head=head)
    for flag, given in (("--int8", int8), ("--encoder", encoder), ("--head", head is not None)):
        if given:
            raise ConfigError(f"{flag} applies to ONNX export: add --onnx")
    spec = _loaded(bundle)
    if spec.bundle_kind != "generator":
        raise BundleError(f"{_name(bundle)} is a classifier bundle: export it with --onnx (an .onnx file for "
                          "onnxruntime), or use it through its bundle (headstart.load / predict)")
    return spec.export_merged(out) if merged else spec.export_adapter(out)


def _export_onnx(bundle: str | Path | BundleSpecialist, out: str | Path, *, int8: bool, encoder: bool,
                 head: str | None) -> Path:
    if is_onnx(bundle) or isinstance(bundle, OnnxSpecialist):
        raise ConfigError(f"{_name(bundle)} is already an ONNX file: export a bundle folder")
    spec = _loaded(bundle, head)
    if spec.bundle_kind != "classifier":
        raise BundleError(f"{_name(bundle)} is a generator bundle: --onnx writes classifiers; export a generator "
                          "without --onnx (a merged transformers folder)")
    from .onnx_export import export_onnx

    source = None if isinstance(bundle, BundleSpecialist) else resolve_bundle(bundle)
    return export_onnx(spec, out, int8=int8, encoder=encoder, source=source)


def _load_onnx(path: str | Path, base: Any, options: dict[str, Any]) -> OnnxSpecialist:
    if base is not None or options.get("head") is not None:
        raise ConfigError(f"{path}: an .onnx file holds its network whole (one head, its own base): "
                          "pick the head with `export --head` instead")
    return OnnxSpecialist.load(path)


def _onnx_info(path: Path) -> dict[str, Any]:
    from .onnx_runtime import read_contract

    c = read_contract(path)
    files = [path, Path(f"{path}.json"), *sorted(p for p in Path(f"{path}.tokenizer").glob("*") if p.is_file())]
    return {"bundle": str(path), "format": "onnx", "kind": c["kind"], "task": c.get("task"),
            "base": c.get("base"), "base_kind": c["base_kind"], "method": c.get("method"), "labels": c["classes"],
            "inputs": c["inputs"], "output": c.get("output"), "int8": c.get("int8", False),
            "headstart_version": c.get("headstart_version"), "source_bundle": (c.get("bundle") or {}).get("path"),
            "files": {str(p): p.stat().st_size for p in files if p.is_file()}}


def _describe_onnx(i: dict[str, Any]) -> str:
    size = sum(i["files"].values()) / 1e6
    lines = [f"onnx       {i['bundle']} ({'int8' if i['int8'] else 'fp32'}, {size:.1f} MB with its contract)",
             f"kind       {i['kind']} ({i['task']}), output {i['output']}, inputs {', '.join(i['inputs'])}",
             f"base       {(i['base'] or {}).get('name')} ({i['base_kind']}), method {i['method']}"]
    if i["labels"]:
        lines.append(f"labels     {', '.join(i['labels'])}")
    lines.append(f"exported   from {i['source_bundle']} with headstart {i['headstart_version']}")
    return "\n".join(lines)


def _loaded(bundle: Any, head: str | None = None) -> Any:
    if isinstance(bundle, (BundleSpecialist, OnnxSpecialist)):
        return bundle
    return load(bundle, head=head) if head is not None else load(bundle)


def _name(bundle: Any) -> str:
    if isinstance(bundle, (BundleSpecialist, OnnxSpecialist)):
        return str(bundle.folder or "this specialist")
    return str(bundle)


def _headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "macro_f1", "split", "examples", "eval_loss", "eval_perplexity", "reward_accuracy",
            "trainable_params", "wall_s")
    return {k: metrics[k] for k in keys if k in metrics}


def _compact(config: dict[str, Any]) -> str:
    import json

    return json.dumps(config, default=str)
