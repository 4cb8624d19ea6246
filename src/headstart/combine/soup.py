"""Greedy soups (Wortsman et al. 2022, "Model soups", recipe 2): sort the runs by held-out score, start
from the best, and add each next run to the uniform average only if the held-out score improves."""
from __future__ import annotations

from typing import Any, Callable

from ..core.errors import ConfigError
from .recipes import Recipe, uniform


def greedy_soup(alone: list[dict[str, Any]], score: Callable[[Recipe], float], n: int,
                log: Callable[[str], None] = print) -> tuple[Recipe, list[dict[str, Any]]]:
    """(the soup's recipe, one row per run tried). `alone[i]["select"]`: run i's own held-out score;
    `score(recipe)`: the held-out score of a soup."""
    if any("select" not in row for row in alone):
        raise ConfigError("a greedy soup needs held-out data for every run (pass data=)")
    order = sorted(range(n), key=lambda i: -alone[i]["select"])
    chosen, best = [order[0]], alone[order[0]]["select"]
    steps = [{"run": alone[order[0]]["bundle"], "select": best, "added": True}]
    log(f"  greedy soup: start from {alone[order[0]]['bundle']} (held-out {best:.4f})")
    for i in order[1:]:
        trial = score(uniform(chosen + [i], n))
        added = trial > best  # strictly better: a tie keeps the smaller soup
        if added:
            chosen, best = chosen + [i], trial
        steps.append({"run": alone[i]["bundle"], "select": round(trial, 4), "added": added})
        log(f"  greedy soup: {'add' if added else 'skip'} {alone[i]['bundle']} (held-out {trial:.4f})")
    return uniform(sorted(chosen), n), steps
