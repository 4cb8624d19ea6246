"""PEFT's `add_weighted_adapter` on the same adapters headstart merges, scored through the same heads and
refits (bench/combine.py's `peft` stage). PEFT combines LoRA A's and B's separately for `linear`, `ties` and
`dare_ties` (the cross-terms headstart's exact deltas avoid); `cat` concatenates them, an exact sum."""
from __future__ import annotations

import torch

COMBINATIONS = [("linear", "avg", None), ("cat", "avg", None), ("ties", "one", 0.2), ("ties", "one", 0.5),
                ("dare_ties", "one", 0.2), ("dare_linear", "one", 0.5)]
"""(combination_type, weights: `avg` = 1/n each (an average) or `one` = 1.0 each, density)."""


def peft_merges(bundles) -> list[dict]:
    from peft import PeftModel

    from headstart.bases import load_base
    from headstart.combine.ingredients import read_ingredients
    from headstart.combine.scoring import judge, refit_heads, task_data
    from headstart.data import loader_for
    from headstart.engine.features import encode

    ings = read_ingredients(bundles)
    tasks = [task_data(i, None, "val", 0) for i in ings]
    backbone = load_base(ings[0].manifest["base"]["name"])
    backbone.name_or_path = backbone.info.name
    model = PeftModel.from_pretrained(backbone, str(ings[0].folder / "adapter"), adapter_name="a0")
    names = ["a0"]
    for k, ing in enumerate(ings[1:], 1):
        model.load_adapter(str(ing.folder / "adapter"), adapter_name=f"a{k}")
        names.append(f"a{k}")
    model.eval()
    load = loader_for(backbone.kind)
    features = lambda items: encode(model, list(items), load, 64, progress=False)  # noqa: E731
    heads = {i.name: i.head for i in ings}
    alone = {}
    for k, (ing, task) in enumerate(zip(ings, tasks)):
        model.set_adapter(names[k])
        alone[ing.name] = judge([task], heads, features, "eval")[ing.name]["kept"]["accuracy"]
    rows, n = [], len(ings)
    for ctype, weights, density in COMBINATIONS:
        name = f"{ctype}_{weights}_{int(round((density or 0) * 100))}"  # module names may not hold dots
        torch.manual_seed(0)
        kwargs = {"density": density} if density is not None else {}
        try:
            model.add_weighted_adapter(names, [1.0 / n if weights == "avg" else 1.0] * n, adapter_name=name,
                                       combination_type=ctype, **kwargs)
        except (ValueError, RuntimeError) as e:
            rows.append({"label": f"{ctype} ({weights})", "error": str(e)[:200]})
            continue
        model.set_adapter(name)
        judged = judge(tasks, heads, features, "eval", refit_heads(tasks, features))
        mean = lambda key: sum(judged[t][key]["accuracy"] / alone[t] for t in judged) / len(judged)  # noqa: E731
        rows.append({"label": f"{ctype} w={'1/n' if weights == 'avg' else 1}"
                              + (f" density={density}" if density else ""),
                     "normalized_kept": mean("kept"), "normalized_refit": mean("refit"),
                     "per_task": {t: {"kept": judged[t]["kept"]["accuracy"], "refit": judged[t]["refit"]["accuracy"],
                                      "alone": alone[t]} for t in judged}})
        model.delete_adapter(name)
    return rows
