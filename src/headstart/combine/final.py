"""The chosen merge, measured: old vs refitted heads per task, BatchNorm statistics re-estimated or not,
each choice made on the selection split and reported on the evaluation split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .recipes import Recipe, combine_buffers, combine_deltas
from .scoring import better_head, judge, refit_heads


@dataclass
class Final:
    recipe: Recipe
    deltas: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    """The head each task keeps (old or refitted), by task name."""
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)
    """BatchNorm statistics to store (re-estimated on the merged body, or averaged finetune ones)."""
    judged: dict[str, Any] = field(default_factory=dict)
    """{"select"|"eval": {task: {"kept": scores, "refit": scores}}} of the stored body."""
    choice: dict[str, str] = field(default_factory=dict)
    batchnorm: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def measure(cls, judge_one, recipe: Recipe, log) -> "Final":
        body, tasks = judge_one.body, judge_one.tasks
        deltas = combine_deltas(judge_one.ings, recipe, judge_one.seed)
        buffers = combine_buffers(judge_one.ings, recipe)
        body.apply(deltas, buffers)
        final = cls(recipe, deltas, judge_one.heads(recipe), statistics=buffers)
        final._judge(judge_one, refit=judge_one.refit and bool(tasks))
        if body.backbone.kind == "image" and tasks and judge_one.refit:
            final._try_batchnorm(judge_one, log)
        return final

    def _judge(self, judge_one, refit: bool) -> None:
        body, tasks = judge_one.body, judge_one.tasks
        new = refit_heads(tasks, body.features) if refit else {}
        self.judged = {w: judge(tasks, judge_one.heads(self.recipe), body.features, w, new) for w in ("select", "eval")}
        self.choice = {name: better_head(row) for name, row in self.judged["select"].items()}
        self.heads = {**judge_one.heads(self.recipe), **{n: new[n] for n, c in self.choice.items() if c == "refit"}}

    def _try_batchnorm(self, judge_one, log) -> None:
        """Re-estimate BN statistics on the tasks' training examples; keep them if the selection split agrees."""
        before = _mean(self.judged, self.choice, "select")
        saved = (self.judged, self.choice, self.heads, self.statistics)
        items = [x for t in judge_one.tasks for x in t.splits.get("refit", t.splits["select"]).items]
        self.statistics = judge_one.body.reestimate_batchnorm(items)
        if not self.statistics:
            self.statistics = saved[3]
            return
        self._judge(judge_one, refit=True)
        after = _mean(self.judged, self.choice, "select")
        self.batchnorm = {"reestimated_on": len(items), "select_before": round(before, 4),
                          "select_after": round(after, 4),
                          "eval_before": _mean(saved[0], saved[1], "eval"), "eval_after": _mean(self.judged, self.choice, "eval")}
        if after < before:  # the pretrained / averaged statistics serve better: restore them
            self.judged, self.choice, self.heads, self.statistics = saved
            judge_one.body.apply(self.deltas, saved[3])
        self.batchnorm["kept"] = after >= before
        log(f"  batchnorm re-estimated on {len(items)} images: selection {before:.4f} -> {after:.4f} "
            f"({'kept' if after >= before else 'not kept'})")

    def summary(self, ingredients: list[dict[str, Any]], shared: bool) -> dict[str, Any]:
        """The report's figures: per task old/refit/chosen on the evaluation split, each specialist alone,
        normalized accuracy (merged / alone)."""
        alone = {row["task"]: row["eval"]["accuracy"] for row in ingredients if row.get("eval")}
        if shared and ingredients and ingredients[0].get("task"):
            alone = {ingredients[0]["task"]: max(r["eval"]["accuracy"] for r in ingredients if r.get("eval"))}
        tasks = {}
        for name, row in self.judged.get("eval", {}).items():
            chosen = self.choice[name]
            tasks[name] = {"kept": row["kept"], **({"refit": row["refit"]} if "refit" in row else {}),
                           "head": chosen, "accuracy": row[chosen]["accuracy"], "macro_f1": row[chosen]["macro_f1"]}
            if name in alone and alone[name]:
                tasks[name]["alone"] = alone[name]
                tasks[name]["normalized"] = round(row[chosen]["accuracy"] / alone[name], 4)
        out: dict[str, Any] = {"recipe": self.recipe.to_json(), "tasks": tasks}
        if tasks:
            out["accuracy"] = round(sum(t["accuracy"] for t in tasks.values()) / len(tasks), 4)
            out["accuracy_kept_heads"] = round(sum(t["kept"]["accuracy"] for t in tasks.values()) / len(tasks), 4)
            norms = [t["normalized"] for t in tasks.values() if "normalized" in t]
            if norms:
                out["normalized"] = round(sum(norms) / len(norms), 4)
        if shared and ingredients:
            evals = [r["eval"]["accuracy"] for r in ingredients if r.get("eval")]
            if evals:
                out["best_ingredient"], out["mean_ingredient"] = max(evals), round(sum(evals) / len(evals), 4)
        if self.batchnorm:
            out["batchnorm"] = self.batchnorm
        return out


def _mean(judged: dict[str, Any], choice: dict[str, str], which: str) -> float:
    """Mean accuracy over tasks on split `which`, each task with its chosen head."""
    rows = judged.get(which, {})
    return round(sum(r[choice[n]]["accuracy"] for n, r in rows.items()) / max(1, len(rows)), 4)
