"""What every reward function shares: the result type, the callable wrapper, the registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from r1lab.tags import THINK_OPEN

NO_REASON = "not judged (no reason given)"


class RewardError(ValueError, RuntimeError):
    """A reward function failed (raised) or judged nothing: one line naming the reward and
    what happened; the CLI prints it without a traceback (`--debug` shows it)."""


class RewardResult(list):
    """Scores (`float`, or `None` = not judged) with one reason per score in `.reasons`.

    A list subclass, so code that only wants the numbers treats it as a plain list. A
    reason is a short phrase: always present for a `None` score (why it could not be
    judged), sometimes for a judged score worth explaining ("no answer"), else `None`.
    """

    def __init__(self, scores: Sequence[float | None], reasons: Sequence[str | None] | None = None):
        super().__init__(scores)
        self.reasons: list[str | None] = (
            list(reasons) if reasons is not None else [None] * len(self)
        )
        if len(self.reasons) != len(self):
            raise ValueError(f"{len(self)} scores but {len(self.reasons)} reasons")
        for i, (s, r) in enumerate(zip(self, self.reasons)):
            if s is None and not r:
                raise ValueError(f"score {i} is None without a reason")


class RewardFunction:
    """A named reward: `fn(prompts, completions, **columns) -> RewardResult`.

    Subclasses implement `score`. Calling checks the batch shape; the reasons travel with
    the result (`RewardResult.reasons`). `__name__` is the metric name
    (`rewards/<name>/mean`).
    """

    __name__ = "reward"

    def __init__(self, name: str | None = None):
        if name is not None:
            self.__name__ = name

    def score(self, prompts: list[str], completions: list[str], **columns: Any) -> RewardResult:
        raise NotImplementedError

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> RewardResult:
        if len(prompts) != len(completions):
            raise ValueError(
                f"reward {self.__name__}: {len(prompts)} prompts but {len(completions)} completions"
            )
        for key, column in columns.items():
            if isinstance(column, (list, tuple)) and len(column) != len(completions):
                raise ValueError(
                    f"reward {self.__name__}: column {key!r} has {len(column)} entries "
                    f"for {len(completions)} completions"
                )
        result = self.score([prompt_text(p) for p in prompts], list(completions), **columns)
        if not isinstance(result, RewardResult):  # a plain list from a wrapped function
            result = list(result)
            result = RewardResult(result, [NO_REASON if s is None else None for s in result])
        if len(result) != len(completions):
            raise ValueError(f"reward {self.__name__} returned {len(result)} scores")
        return result

    def __repr__(self) -> str:
        return f"<reward {self.__name__}>"


class FunctionReward(RewardFunction):
    """A `RewardFunction` made from a plain function with the same signature."""

    def __init__(self, fn: Callable[..., Sequence[float | None]], name: str):
        super().__init__(name)
        self._fn = fn

    def score(self, prompts: list[str], completions: list[str], **columns: Any) -> RewardResult:
        return self._fn(prompts, completions, **columns)


def prompt_text(prompt: Any) -> str:
    """A prompt as text: strings as they are; a chat (list of messages) as its last content."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def prefills_think(prompt: str) -> bool:
    """True when the prompt opens the reasoning block itself, so the completion starts in it."""
    return prompt.rstrip().endswith(THINK_OPEN)


def finite_or_none(value: Any) -> tuple[float | None, str | None]:
    """A score as float, or (None, reason) when it is missing or not a finite number."""
    if value is None:
        return None, "no score"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None, f"score is not a number: {value!r}"[:200]
    if not math.isfinite(x):
        return None, f"score is not finite: {x}"
    return x, None


# --- registry -------------------------------------------------------------------------

# Reward factories by name, filled by `register_reward`. Read them through
# `r1lab.rewards.get_reward`, which imports every built-in reward module first.
REGISTERED: dict[str, Callable[..., Callable]] = {}


def register_reward(name: str):
    """Decorator: make a reward factory findable by name (`get_reward(name, **options)`)."""

    def wrap(factory):
        REGISTERED[name] = factory
        return factory

    return wrap
