"""Tasks: what is being learned (classify, sft, dpo), each owning its data loading, default base and
method, evaluation and artifact. `headstart.fit(..., task=NAME)` runs the same steps for every task.

    from headstart.tasks import get_task, list_tasks
    [t.name for t in list_tasks()]          # ['classify', 'sft', 'dpo']
    get_task("sft").default_method         # 'lora'

Adding a task:
1. A module `tasks/<name>.py` with a `Task` subclass: `load_data` (path -> what the methods train on),
   `start` (the base or the `init=` bundle training starts from), `fingerprint` (what identifies the data
   for resume), `artifact` (the specialist and its manifest), `evaluate` (its metrics), `report` (the
   closing log line), and `default_method` / `inputs` (which optional fit arguments it reads).
2. `register_task("<name>", MyTask())` at its end, and the module's import in `registry._ensure_builtins`.
3. Its methods: packages under `methods/` registered with `register_method(name, task="<name>", ...)`
   (a method's `fit(start.backbone, data, ctx)` returns a `FitResult`).
4. A test that fits it end to end on a tiny base (see tests/test_llm_tasks.py).
"""
from .registry import FitSettings, Start, Task, get_task, list_tasks, register_task

__all__ = ["FitSettings", "Start", "Task", "get_task", "list_tasks", "register_task"]
