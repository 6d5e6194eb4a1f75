"""Tasks: questions with reference answers and the rule that checks them.

Each task module registers its tasks by name (`r1lab.tasks.base.register_task`); this package
imports all of them, so `get_task` and `task_names` see every built-in task.
"""

from r1lab.tasks import code as _code  # noqa: F401  (the imports register the built-ins)
from r1lab.tasks import gym as _gym  # noqa: F401
from r1lab.tasks import math as _math  # noqa: F401
from r1lab.tasks import procedural as _procedural  # noqa: F401
from r1lab.tasks.base import REGISTERED, Example, Task, register_task

__all__ = ["Example", "Task", "get_task", "register_task", "task_names"]


def get_task(name: str, **options) -> Task:
    """Build the task called `name`; an unknown name lists the known ones."""
    if name not in REGISTERED:
        known = ", ".join(sorted(REGISTERED))
        raise KeyError(f"unknown task {name!r}; known tasks: {known}")
    return REGISTERED[name](**options)


def task_names() -> list[str]:
    return sorted(REGISTERED)
