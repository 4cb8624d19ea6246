"""Where the memory goes: a per-phase profile of one training step (SFT lora / qlora on smollm2-135m, image
finetune) and of a probe (feature extraction + the head's fit), each configuration in its own process.

Phases, as resident memory (RSS) of the process: the runtime and imports; the weights; the optimizer state
(bytes of AdamW's tensors after its first step); the forward's activations (peak during the forward above
what was resident before it); logits and loss (peak while the LM head / classifier and the loss run);
the backward's peak; the allocator's slack (RSS after the step minus the runtime and the live tensors'
bytes: memory the allocator keeps but nothing uses). Every model, loss and plan comes from the library,
so the table reports whatever the code does when it runs.

    .venv/bin/python bench/footprint.py            # batch 8 x 512 tokens; prints a table, writes bench/results/footprint.json
    .venv/bin/python bench/footprint.py --quick    # a tiny version (tests)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIGS = ("sft-lora", "sft-qlora", "finetune", "probe")
PHASES = ("runtime", "weights", "optimizer", "forward", "loss", "backward", "slack")
MB = 1 << 20


class Phases:
    """Peak RSS per phase: `with phases("forward", split=(body, "loss")): ...` records what the phase adds
    above the RSS at its start, the first time it runs (later micro-batches reuse what the allocator kept); with `split`, the phase ends when the module `body` first returns (the LM's
    decoder, the image base) and the named phase (logits and loss) takes over until the block ends."""

    def __init__(self):
        self.out: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, split: tuple | None = None):
        from headstart.engine.memory import PeakSampler, rss_bytes

        current = [name]

        def hook(*_):
            if current[0] == name:
                self.out.setdefault(name, (sampler.peak - sampler.start) / MB)
                current[0] = split[1]
                sampler.start = sampler.peak = rss_bytes()

        with PeakSampler() as sampler:
            handle = split[0].register_forward_hook(hook) if split else None
            try:
                yield sampler
            finally:
                if handle is not None:
                    handle.remove()
        self.out.setdefault(current[0], (sampler.peak - sampler.start) / MB)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (parameters, buffers, optimizer state, ...)."""
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # tensors without storage (meta, sparse) hold no memory here
            continue
    return sum(seen.values())


def import_runtime(*modules: str) -> None:
    """Import what the phases would otherwise import lazily: libraries count as runtime, not as weights."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def optimizer_bytes(opt) -> int:
    return sum(t.nbytes for state in opt.state.values() for t in state.values() if hasattr(t, "nbytes"))


def run_sft(quantize: str | None, batch: int, length: int, rows: int) -> dict:
    import torch

    from headstart.engine.memory import rss_bytes
    from headstart.engine.perf import release_freed_memory
    from headstart.engine.trainer import autocast
    from headstart.llm.footprint import plan_adapter_memory
    from headstart.llm.data import load_sft_examples
    from headstart.llm.model import add_lora, bf16_enabled, load_lm
    from headstart.llm.tokenize import encode_chat, pad_batch
    from headstart.llm.train import answer_loss
    from headstart.methods.sft.config import SFTConfig

    import_runtime("transformers", "peft", "bitsandbytes")
    release_freed_memory()  # as the sft task does before it loads the base
    phases, runtime = Phases(), rss_bytes()
    cfg = SFTConfig()
    with phases("weights"):
        model, tokenizer, _ = load_lm("smollm2-135m", quantize=quantize)
        model = add_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.targets())
    examples, _ = load_sft_examples(DATA / "alpaca_en_demo" / "train.jsonl")
    encoded = [encode_chat(tokenizer, ex.messages, length) for ex in examples[:rows]]
    bf16 = bf16_enabled(cfg.bf16)
    lm = model.get_base_model()
    longest = pad_batch([max(encoded, key=lambda r: len(r["input_ids"]))], tokenizer.pad_token_id)

    def one_example():
        with autocast(bf16, "cpu"):
            return answer_loss(model, longest)

    # the sft method's plan (on a CPU: 2 per forward without checkpointing when the budget has room); the
    # profile is one forward + backward of the plan's micro-batch: each accumulated part repeats its peak
    plan = plan_adapter_memory(model, one_example, tokens=int(longest["input_ids"].shape[1]), batch_size=batch,
                               checkpointing=cfg.gradient_checkpointing, micro_batch=cfg.micro_batch, budget=None,
                               log=lambda line: None)
    checkpointing = plan.checkpointing == "on"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    model.train()
    for step in range(1):  # one micro-batch (slow on 2 cores): the first step's peaks are the run's
        rows_ = [encoded[(step * batch + i) % len(encoded)] for i in range(plan.micro_batch)]
        padded = pad_batch([{**r, "input_ids": r["input_ids"][:length], "labels": r["labels"][:length]}
                            for r in rows_], tokenizer.pad_token_id)
        t0 = time.perf_counter()
        with autocast(bf16, "cpu"):
            with phases("forward", split=(lm.model, "loss")):
                loss = answer_loss(model, padded)
        with phases("backward"):
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
    return finish(phases, runtime, opt, {"config": f"sft-{'qlora' if quantize else 'lora'}", "batch": batch,
                                         "micro_batch": plan.micro_batch,
                                         "length": int(padded["input_ids"].shape[1]), "bf16": bf16,
                                         "gradient_checkpointing": checkpointing, "step_s": round(step_s, 2),
                                         "plan_estimate_mb": plan.estimate >> 20})


def finish(phases: Phases, runtime: int, opt, row: dict) -> dict:
    from headstart.engine.memory import peak_rss_bytes, rss_bytes

    gc.collect()
    live = live_tensor_bytes()
    row.update({"runtime": runtime / MB, "optimizer": optimizer_bytes(opt) / MB if opt is not None else 0.0,
                "slack": (rss_bytes() - runtime - live) / MB, "live_tensors": live / MB,
                "peak": peak_rss_bytes() / MB})
    return row | {k: v for k, v in phases.out.items() if k in PHASES}


def image_base(size: int):
    import headstart

    base = headstart.load_base("efficientnet-lite0")
    base.set_input_size(size)
    return base


def run_finetune(size: int, batch: int) -> dict:
    import torch

    from headstart.data import load_dataset, loader_for
    from headstart.engine.memory import rss_bytes
    from headstart.methods.base import SpecialistModel
    from headstart.methods.finetune.memory import plan_training

    import_runtime("timm", "torchvision")
    phases, runtime = Phases(), rss_bytes()
    with phases("weights"):
        model = SpecialistModel(image_base(size), 2)
    train = load_dataset(DATA / "hymenoptera").split("train")
    load = loader_for("image")
    model.train()
    model.base.freeze_batchnorm()
    plan = plan_training(model, model.collate([load(train.items[0])], False), batch, None, log=lambda _: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for step in range(1):  # one step, its phases from its first micro-batch: growth from a fresh heap
        idx = list(range(step * batch, (step + 1) * batch))
        labels = torch.tensor([train.labels[i] for i in idx])
        t0 = time.perf_counter()
        for start in range(0, batch, plan.micro_batch):  # the plan's micro-batches, one backward each
            part = idx[start:start + plan.micro_batch]
            pixels = model.collate([load(train.items[i]) for i in part], True)
            with phases("forward", split=(model.backbone, "loss")):
                loss = torch.nn.functional.cross_entropy(model(**pixels), labels[start:start + len(part)])
            with phases("backward"):
                (loss * len(part) / batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
    return finish(phases, runtime, opt, {"config": "finetune", "image_size": size, "batch": batch,
                                         "micro_batch": plan.micro_batch, "step_s": round(step_s, 2)})


def run_probe(size: int, images: int) -> dict:
    import torch

    from headstart.data import load_dataset, loader_for
    from headstart.engine.features import encode, extraction_batch
    from headstart.engine.memory import rss_bytes
    from headstart.methods.probe.method import fit_head_with_l2_search

    import_runtime("timm", "torchvision")
    phases, runtime = Phases(), rss_bytes()
    with phases("weights"):
        base = image_base(size)
    train = load_dataset(DATA / "hymenoptera").split("train")
    items, labels = train.items[:images], train.labels[:images]
    t0 = time.perf_counter()
    with phases("forward"):  # inference only: no optimizer, no backward
        x = encode(base, items, loader_for("image"), 64, progress=False)
    with phases("loss"):
        fit_head_with_l2_search(x, labels, 2, [1e-3, 1e-2, 1e-1])
    row = {"config": "probe", "image_size": size, "images": len(items), "extraction_batch":
           extraction_batch(base, 64), "step_s": round(time.perf_counter() - t0, 2)}
    del x
    return finish(phases, runtime, None, row) | {"optimizer": None, "backward": None}


def one(config: str, quick: bool) -> dict:
    if config.startswith("sft-"):
        batch, length, rows = (2, 64, 4) if quick else (8, 512, 64)
        return run_sft("nf4" if config == "sft-qlora" else None, batch, length, rows)
    if config == "finetune":
        return run_finetune(*((160, 4) if quick else (288, 16)))
    return run_probe(*((160, 8) if quick else (288, 244)))


def table(rows: list[dict]) -> str:
    head = "| config | " + " | ".join(PHASES) + " | peak | step s |"
    lines = [head, "|" + "---|" * (len(PHASES) + 3)]
    for r in rows:
        cells = ["n/a" if r.get(p) is None else f"{r[p]:.0f}" for p in PHASES]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {r['peak']:.0f} | {r['step_s']} |")
    return "\n".join(lines) + "\n\n(MB; runtime and peak are resident totals, the rest what each phase adds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated of {CONFIGS}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "footprint.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.quick)))
        return
    rows = []
    for config in args.configs.split(","):  # one process each: peaks never mix
        cmd = [sys.executable, __file__, "--one", config] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
