"""DPO on real preferences (issue 18): SPIN-style pairs from alpaca, DPO from the SFT bundle, checked held out.

    .venv/bin/python bench/dpo.py                        # 800 training pairs, 100 held out (~2.5 h on 2 cores)
    .venv/bin/python bench/dpo.py --pairs 32 --held-out 8 --work runs/bench-dpo-small   # a quick check

1. **SFT**: smollm2-135m, LoRA, 1 epoch on alpaca_en_demo's 899 training rows (bench/sft.py's run), kept in
   `--work` and reused by a later run.
2. **Pairs** (SPIN, Chen et al. 2024): for the first `--pairs` training prompts and the first `--held-out`
   test prompts, chosen = the reference answer, rejected = the SFT model's own greedy answer (at most
   `--max-new-tokens`), decoded several at a time (`headstart.llm.decode_batch.answer_all`); each answer is
   appended to `<work>/pairs.partial.jsonl` as it finishes, so an interrupted run resumes where it stopped.
   A pair whose answers are identical (no preference) or whose rejected answer is empty is dropped and counted;
   the next training prompts make up for dropped training pairs (while they add pairs), so DPO gets `--pairs`.
3. **DPO**: `headstart fit pairs_train.jsonl --task dpo --init <sft> --eval pairs_held.jsonl`, 1 epoch.
4. **Checks**: held-out preference accuracy (implicit reward margin > 0) and mean margin; the held-out SFT
   loss (alpaca test.jsonl, loss per answer token) of the SFT and the DPO bundle; base vs SFT vs DPO answers
   on `--show` held-out prompts, side by side.

Targets (issue 18): held-out preference accuracy >= 0.7 after one epoch on 800 pairs; SFT held-out loss rises
by <= 0.05. Writes bench/results/dpo.json and bench/results/dpo_side_by_side.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import headstart
from headstart.core.storage import atomic_write_text
from headstart.llm.data import load_sft_examples
from headstart.llm.decode_batch import answer_all

from sft import DATA, REPO, RESULTS, headstart_command, run_headstart


def conversations(split: str, limit: int | None = None) -> list[dict]:
    """The first `limit` rows (default all) of alpaca's `split` as {split, key, messages} (the last message: the
    reference)."""
    examples, _ = load_sft_examples(DATA / f"{split}.jsonl")
    return [{"split": split, "key": f"{split}:{i}", "messages": ex.messages} for i, ex in enumerate(examples[:limit])]


def build_pairs(sft: Path, rows: list[dict], partial: Path, max_new_tokens: int, together: int) -> list[dict]:
    """One pair per row: its reference answer against the SFT model's greedy one (resumes from `partial`)."""
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["key"]] = record
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut by an interruption: that answer is made again
    prompts = {r["key"]: r["messages"][:-1] for r in rows}
    todo = [key for key in prompts if key not in done]
    print(f"pairs: {len(done)} answers kept from an earlier run, {len(todo)} to make", flush=True)
    if todo:
        spec = headstart.load(sft)
        spec.model.eval()
        t0, made = time.perf_counter(), [0]
        with partial.open("a") as out:
            def save(i: int, answer: str) -> None:
                record = {"key": todo[i], "rejected": answer}
                out.write(json.dumps(record) + "\n")
                out.flush()
                done[todo[i]] = record
                made[0] += 1
                if made[0] % 25 == 0 or made[0] == len(todo):
                    print(f"  {made[0]}/{len(todo)} answers, {time.perf_counter() - t0:.0f} s", flush=True)

            answer_all(spec.model, spec.tokenizer, [prompts[k] for k in todo], together=together, on_answer=save,
                       max_new_tokens=max_new_tokens, temperature=0)
    return [{"split": r["split"], "prompt": r["messages"][:-1], "chosen": r["messages"][-1]["content"],
             "rejected": done[r["key"]]["rejected"]} for r in rows]


def write_jsonl(path: Path, pairs: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                    for p in pairs))


def run_dpo(pairs_train: Path, pairs_held: Path, sft: Path, out: Path) -> dict:
    command, env = headstart_command(None)
    cmd = [*command, "fit", str(pairs_train), "--task", "dpo", "--init", str(sft), "--eval", str(pairs_held),
           "--epochs", "1", "--side-by-side", "0", "--out", str(out), "--json"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # its progress goes to our stderr
    if proc.returncode != 0:
        raise SystemExit(f"DPO failed (exit {proc.returncode}): its error is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_by_side(sft: Path, dpo: Path, rows: list[dict], max_new_tokens: int) -> tuple[str, dict]:
    """Greedy answers of the base (the SFT bundle with its adapter off), the SFT and the DPO model to held-out
    prompts, as markdown."""
    prompts = [r["messages"][:-1] for r in rows]
    options = dict(together=len(prompts), temperature=0, max_new_tokens=max_new_tokens)
    answers = {}
    for name, bundle in (("sft", sft), ("dpo", dpo)):
        spec = headstart.load(bundle)
        if name == "sft":
            with spec.model.disable_adapter():
                answers["base"] = answer_all(spec.model.eval(), spec.tokenizer, prompts, **options)
        answers[name] = answer_all(spec.model.eval(), spec.tokenizer, prompts, **options)
    lines = ["# Base vs SFT vs DPO on held-out alpaca prompts", "",
             f"smollm2-135m; greedy, at most {max_new_tokens} new tokens; SFT = LoRA 1 epoch on alpaca_en_demo; "
             "DPO = 1 epoch on SPIN pairs from that SFT model (bench/dpo.py).", ""]
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        lines += [f"## {i + 1}. {prompt[-1]['content']}", "", f"**Reference:** {row['messages'][-1]['content']}", ""]
        lines += [f"**{label}:** {answers[name][i]}\n"
                  for name, label in (("base", "Base"), ("sft", "SFT"), ("dpo", "DPO"))]
    return "\n".join(lines), answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=800)
    p.add_argument("--held-out", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on the SFT model's rejected answers")
    p.add_argument("--together", type=int, default=8, help="answers decoded in one batched forward")
    p.add_argument("--show", type=int, default=5, help="held-out prompts answered side by side")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-dpo"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = conversations("train"), conversations("test", args.held_out)
    result: dict = {"settings": {**vars(args), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}}
    sft = work / "alpaca-lora"
    if not (sft / "manifest.json").exists():
        print("== SFT (lora, 1 epoch)", flush=True)
        result["sft"] = run_headstart("lora", DATA / "train.jsonl", DATA / "test.jsonl", work, 1,
                                      ["--side-by-side", "0"])
        if "error" in result["sft"]:
            raise SystemExit(f"SFT failed: {result['sft']['error']}")
    else:
        print(f"== SFT: reusing {sft}", flush=True)
        result["sft"] = json.loads((sft / "manifest.json").read_text()).get("metrics", {})
    print("== pairs", flush=True)
    asked, short = args.pairs, None
    while True:  # answers identical to the reference are no preference: more prompts make up for them
        pairs = build_pairs(sft, train_rows[:asked] + test_rows, work / "pairs.partial.jsonl", args.max_new_tokens,
                            args.together)
        kept = [q for q in pairs if q["rejected"].strip() and q["chosen"].strip() != q["rejected"].strip()]
        was_short, short = short, args.pairs - sum(q["split"] == "train" for q in kept)
        if short <= 0 or asked >= len(train_rows) or short == was_short:  # done, no prompts left, or no use
            break
        asked += short
    if short > 0:
        print(f"pairs: {short} short of --pairs {args.pairs} (answers empty or identical to the reference)",
              flush=True)
    result["pairs"] = {"train": sum(q["split"] == "train" for q in kept),
                       "held_out": sum(q["split"] == "test" for q in kept),
                       "dropped_empty_or_identical": len(pairs) - len(kept),
                       # a preference that is only "longer" is easy to learn: the lengths say whether it could be
                       "mean_chars_chosen": sum(len(q["chosen"]) for q in kept) / max(1, len(kept)),
                       "mean_chars_rejected": sum(len(q["rejected"]) for q in kept) / max(1, len(kept))}
    write_jsonl(work / "pairs_train.jsonl", [q for q in kept if q["split"] == "train"])
    write_jsonl(work / "pairs_held.jsonl", [q for q in kept if q["split"] == "test"])
    print(f"== DPO on {result['pairs']['train']} pairs ({result['pairs']['held_out']} held out)", flush=True)
    result["dpo"] = run_dpo(work / "pairs_train.jsonl", work / "pairs_held.jsonl", sft, work / "alpaca-dpo")
    print("== held-out SFT loss, side by side", flush=True)
    loss = {name: headstart.load(work / b).evaluate(DATA / "test.jsonl")["loss"]
            for name, b in (("sft", "alpaca-lora"), ("dpo", "alpaca-dpo"))}
    result["sft_loss"] = {**loss, "rise": loss["dpo"] - loss["sft"]}
    report, answers = side_by_side(sft, work / "alpaca-dpo", test_rows[:args.show], 160)
    result["side_by_side"] = answers
    d = result["dpo"]
    result["targets"] = {"held_out_preference_accuracy >= 0.7": d["reward_accuracy"] >= 0.7,
                         "sft_loss_rise <= 0.05": result["sft_loss"]["rise"] <= 0.05}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "dpo_side_by_side.md", report + "\n")
    atomic_write_text(RESULTS / "dpo.json", json.dumps(result, indent=1) + "\n")
    print(f"held-out preference accuracy {d['reward_accuracy_before']:.3f} -> {d['reward_accuracy']:.3f}, "
          f"margin {d['reward_margin']:+.3f}, DPO loss {d['eval_dpo_loss_before']:.4f} -> {d['eval_dpo_loss']:.4f}; "
          f"SFT held-out loss {loss['sft']:.4f} -> {loss['dpo']:.4f} ({result['sft_loss']['rise']:+.4f}); "
          f"targets {result['targets']}")
    print(f"wrote {RESULTS / 'dpo.json'}, {RESULTS / 'dpo_side_by_side.md'}")


if __name__ == "__main__":
    main()
