"""What a task is: examples with reference answers, and a rule that checks an answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from r1lab.tasks.answers import Verdict


@dataclass
class Example:
    """One question with its reference answer.

    `meta` carries whatever the source knows beyond that (subject, level, language, a
    worked solution, the reasoning-gym entry needed by its scorer, ...).
    """

    question: str
    answer: str
    meta: dict = field(default_factory=dict)


class Task:
    """A source of examples that knows how its answers are checked.

    Subclasses set `name` and implement `examples`, and say how an already-extracted
    answer is checked by implementing one of two methods: `verify` (right or wrong) or
    `judge` (a score in [0, 1], or None with the reason it could not be judged). Callers
    always ask `judge`, which by default turns `verify`'s answer into a verdict.
    """

    name: str = "task"

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Example]:
        raise NotImplementedError

    def judge(self, predicted: str, reference: str, example: Example | None = None) -> Verdict:
        """The verdict on `predicted` (the one call every grader makes)."""
        return Verdict(1.0 if self.verify(predicted, reference, example) else 0.0)

    def verify(self, predicted: str, reference: str, example: Example | None = None) -> bool:
        return predicted.strip() == reference.strip()


# Task factories by name, filled by `register_task`. Read them through `r1lab.tasks.get_task`,
# which imports every built-in task module first.
REGISTERED: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Class decorator: make a task findable by name in configs and on the command line."""

    def wrap(factory):
        REGISTERED[name] = factory
        return factory

    return wrap
