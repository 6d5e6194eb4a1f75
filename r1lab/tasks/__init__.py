"""Tasks: questions with reference answers and the rule that checks them."""

from r1lab.tasks.base import Example, Task, get_task, register_task, task_names

__all__ = ["Example", "Task", "get_task", "register_task", "task_names"]
from r1lab.tasks import code as _code  # noqa: F401
from r1lab.tasks import gym as _gym  # noqa: F401
from r1lab.tasks import math as _math  # noqa: F401
from r1lab.tasks import procedural as _procedural  # noqa: F401
