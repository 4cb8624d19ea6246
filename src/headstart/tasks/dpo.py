"""`dpo`: preference pairs (JSONL rows with prompt, chosen, rejected) -> a generator tuned by DPO.

    spec = headstart.fit("prefs.jsonl", task="dpo", init="runs/alpaca-lora", out="runs/alpaca-dpo")

Usually started from an SFT bundle (`init=`, or the older spelling `base=<bundle folder>`): its adapter is
the policy and, frozen as loaded, the reference. Started from a base, the policy is a fresh adapter.
"""
from __future__ import annotations

from pathlib import Path

from .registry import register_task
from .sft import SFTTask


class DPOTask(SFTTask):
    summary = "preference pairs -> a generator tuned by DPO (usually from an sft bundle: init=)"
    held_share = "the pairs"

    def examples(self, path) -> tuple[list, list]:
        from ..llm.data import load_preference_examples

        return load_preference_examples(path)

    def save(self, specialist, data, out: Path, settings) -> Path:
        specialist.manifest["bundle_name"] = str(out)
        return specialist.save(out)

    def report(self, specialist, data) -> str:
        m = specialist.manifest["metrics"]
        return (f"dpo {specialist.method} on {specialist.manifest['base']['name']} -> {data.source}: held-out reward "
                f"accuracy {m['reward_accuracy_before']:.3f} -> {m['reward_accuracy']:.3f}, DPO loss "
                f"{m['eval_dpo_loss_before']:.4f} -> {m['eval_dpo_loss']:.4f}, {m['wall_s']} s")


register_task("dpo", DPOTask())
