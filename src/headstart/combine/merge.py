"""Merge specialists of one base into one: soups, task arithmetic, TIES, DARE; a head per task.

    headstart merge runs/trec-s0 runs/trec-s1 runs/trec-s2 --method soup --greedy-on val --out runs/trec-soup
    headstart merge runs/sst2 runs/trec runs/emotion runs/subj --method ties --density 0.2 --out runs/four

The path: read each specialist's task vector (`ingredients`), score each alone on its task's held-out data
(`scoring`), choose the recipe (given, greedy soup, or `auto` over a grid: `recipes`), apply it to one
loaded base (`body`), keep old or refitted heads per task by the selection split, re-estimate BatchNorm
statistics for image bases, and write the result as a normal bundle (`output`): a LoRA adapter of the
chosen rank, one head (same labels) or a head per task.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.errors import ConfigError
from .ingredients import Ingredient, same_labels
from .recipes import Recipe, alone, combine_buffers, combine_deltas, combine_heads, grid, make_recipe
from .scoring import TaskData, better_head, judge, mean_accuracy, refit_heads, task_data

if TYPE_CHECKING:
    from .final import Final


def merge(bundles: list[str], *, method: str = "auto", weights: list[float] | None = None,
          scale: float | None = None, density: float = 0.2, majority: str = "total", greedy_on: str | None = None,
          data: list[str] | None = None, refit: bool = True, rank: int | None = None, seed: int = 0,
          out: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge specialists of one base (LoRA or finetune, classifiers) into one specialist, and report the
    held-out accuracy of the result beside each specialist alone.

    Args:
        bundles: Two or more specialist bundles on the same base weights, made by one method.
        method: `soup` (a uniform average; with `greedy_on`, Wortsman et al.'s greedy soup), `linear`
            (a weighted average), `task_arithmetic` (sum of task vectors times `scale`), `ties` (trim to
            `density`, elect signs, disjoint mean), `dare_linear` / `dare_ties` (drop at random, rescale,
            then sum / TIES), `magnitude` (prune, then sum), or `auto` (try the methods and a small grid of
            scale and density on the selection split; keep the best).
        weights: One weight per specialist (default: equal).
        scale: lambda, the task vectors' scale (default: 0.5 for task arithmetic, DARE-linear and
            magnitude; 1.0 for TIES and DARE-TIES, whose disjoint mean already averages).
        density: Share of each task vector kept by ties, dare_* and magnitude.
        majority: TIES' sign election: `total` or `frequency`.
        greedy_on: soup: the split to choose ingredients on (`val`): add one only if that score improves.
        data: One dataset per specialist (same order) to score on, refit heads on and re-estimate BatchNorm
            on; default: each specialist's recorded training data, when still on disk.
        refit: Also fit new heads on the merged body's features; each task keeps the head that scores
            higher on its selection split (merged bodies drift away from their old heads).
        rank: Rank of the merged LoRA adapter (truncated SVD; the report gives the energy kept); default:
            exact (the merged delta's own rank).
        seed: Seed of DARE's random drops and of holdouts carved from training data.
        out: Folder of the merged bundle (atomically); nothing is written when unset.
        log: Where progress lines go.

    >>> report = merge(["runs/trec-s0", "runs/trec-s1"], method="soup", out="runs/trec-soup")
    >>> report["accuracy"], [i["eval"]["accuracy"] for i in report["ingredients"]]
    """
    from ..bases import load_base
    from ..bundle.lineage import is_lineage
    from .body import DeltaBody
    from .ingredients import read_ingredients

    bundles = [Path(b) for b in bundles]
    if len(bundles) < 2:
        raise ConfigError("merge needs two or more specialists")
    if data is not None and len(data) not in (1, len(bundles)):
        raise ConfigError(f"{len(data)} datasets for {len(bundles)} specialists: give one per specialist (or one)")
    if greedy_on is not None and method != "soup":
        raise ConfigError("--greedy-on chooses a soup's ingredients: use it with --method soup")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if out is not None and is_lineage(out):
        raise ConfigError(f"{out} holds the versions of an updated specialist; a merge there would replace them all")
    first = _first_manifest(bundles[0])
    backbone = load_base(first["base"]["name"], pretrained=True)
    body = DeltaBody(backbone)
    ings = read_ingredients(bundles, body.state())
    shared = same_labels(ings)
    tasks = _tasks(ings, data, shared, greedy_on or "val", seed, log)
    judge_one = _Judge(body, ings, tasks, shared, seed, refit)
    log(f"merge: {len(ings)} {ings[0].method} specialists on {first['base']['name']}; "
        + ("one label set: one merged head" if shared else f"{len(tasks)} tasks: a head per task"))
    report: dict[str, Any] = {"ingredients": judge_one.each_alone(log)}
    recipe = _choose(method, ings, weights, scale, density, majority, greedy_on, judge_one, report, log)
    final = judge_one.final(recipe, log)
    report.update(final.summary(report["ingredients"], shared))
    if out is not None:
        from .output import write_merged

        report["rank"], report["energy"], report["bundle"] = write_merged(
            Path(out), backbone, body, ings, tasks, final, rank, report, log)
    log(_summary_line(report))
    return report


def _first_manifest(folder: Path) -> dict[str, Any]:
    from ..bundle.format import read_manifest
    from ..bundle.lineage import resolve_bundle

    return read_manifest(resolve_bundle(folder))


def _tasks(ings: list[Ingredient], data, shared: bool, select_on: str, seed: int, log) -> list[TaskData]:
    """One task (same label set: the first specialist's data) or one per specialist."""
    sources = list(data) * (len(ings) if data is not None and len(data) == 1 else 1) if data else [None] * len(ings)
    chosen = [(ings[0], sources[0])] if shared else list(zip(ings, sources))
    tasks = []
    for ing, source in chosen:
        task = task_data(ing, source, select_on, seed)
        if task is None:
            log(f"  {ing.name}: no data at hand (recorded {ing.data_source!r} is gone; pass data=): not scored")
            continue
        tasks.append(task)
    return tasks


def _choose(method, ings, weights, scale, density, majority, greedy_on, judge_one, report, log) -> Recipe:
    n = len(ings)
    if method == "auto":
        if not judge_one.tasks:
            raise ConfigError("--method auto chooses on held-out data: none is at hand (pass data=)")
        tried = [(judge_one.select_score(r), r) for r in grid(n)]
        report["candidates"] = [{**r.to_json(), "select_accuracy": round(s, 4)} for s, r in tried]
        best = max(tried, key=lambda t: t[0])[1]
        log(f"auto: {best.label()} scored best of {len(tried)} on the selection split")
        return best
    recipe = make_recipe(method, n, weights, scale, density, majority)
    if greedy_on is not None:
        from .soup import greedy_soup

        recipe, steps = greedy_soup(report["ingredients"], judge_one.select_score, n, log)
        report["greedy"] = steps
    return recipe


class _Judge:
    """Scores recipes: applies one to the body and measures every task, with kept and refitted heads."""

    def __init__(self, body, ings: list[Ingredient], tasks: list[TaskData], shared: bool, seed: int, refit: bool):
        self.body, self.ings, self.tasks, self.shared, self.seed, self.refit = body, ings, tasks, shared, seed, refit

    def heads(self, recipe: Recipe) -> dict[str, dict]:
        if self.shared:
            return {t.name: combine_heads(self.ings, recipe, t.classes) for t in self.tasks}
        return {i.name: i.head for i in self.ings}

    def set(self, recipe: Recipe) -> None:
        self.body.apply(combine_deltas(self.ings, recipe, self.seed), combine_buffers(self.ings, recipe))

    def measure(self, recipe: Recipe, which: tuple[str, ...], refit: bool) -> dict[str, dict]:
        self.set(recipe)
        new = refit_heads(self.tasks, self.body.features) if refit else None
        return {w: judge(self.tasks, self.heads(recipe), self.body.features, w, new) for w in which}

    def select_score(self, recipe: Recipe) -> float:
        judged = self.measure(recipe, ("select",), self.refit and not self.shared)["select"]
        return mean_accuracy(judged, better_head)

    def each_alone(self, log) -> list[dict[str, Any]]:
        rows = []
        for i, ing in enumerate(self.ings):
            own = [t for t in self.tasks if self.shared or t.name == ing.name]
            saved, self.tasks = self.tasks, own
            try:
                judged = self.measure(alone(len(self.ings), i), ("select", "eval"), False)
            finally:
                self.tasks = saved
            row = {"bundle": str(ing.folder), "task": own[0].name if own else None}
            if own:
                row.update(select=judged["select"][own[0].name]["kept"]["accuracy"],
                           eval=judged["eval"][own[0].name]["kept"])
                log(f"  alone {ing.name:<24} select {row['select']:.4f}  eval {row['eval']['accuracy']:.4f}")
            rows.append(row)
        return rows

    def final(self, recipe: Recipe, log) -> "Final":
        from .final import Final

        return Final.measure(self, recipe, log)


def _summary_line(report: dict[str, Any]) -> str:
    facts = []
    if report.get("accuracy") is not None:
        facts.append(f"accuracy {report['accuracy']:.4f}")
    if report.get("normalized") is not None:
        facts.append(f"normalized {report['normalized']:.3f} of the specialists alone")
    if report.get("bundle"):
        facts.append(f"-> {report['bundle']}")
    return f"merged ({report['recipe']['label']})" + (": " + ", ".join(facts) if facts else "")
