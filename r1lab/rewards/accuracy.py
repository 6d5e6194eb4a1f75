"""Accuracy: is the final answer right?

Only the final answer counts (`r1lab.tasks.answers.extract_answer`): an answer that
appears only inside the reasoning, a missing or empty answer, or several candidate
answers are judged wrong (0.0). A checker failure (math-verify error or timeout, a
crashing scorer) is `None` with its reason, never a silent 0.

How an answer is compared, per row, first match wins:
1. a `verify` column: a callable `verify(predicted, reference) -> bool | float`;
2. a `task` column: a task name (`get_task(name)`) or a `Task`; its `judge` (score and
   reason) when it has one, else its `verify`. `meta` (a column of dicts) is passed to
   the task as `Example.meta` (reasoning-gym needs its entry there);
3. the reward's `kind`: "math" (math-verify, the default), "exact" (string match after
   normalisation) or "gym" (reasoning-gym, family from `meta`).

The reference answers come in the `answer` column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from r1lab.rewards.base import RewardFunction, RewardResult, prefills_think, register_reward
from r1lab.tasks import Example, Task, get_task
from r1lab.tasks.answers import (
    Verdict,
    extract_answer,
    is_multiple_answers,
    judge_exact,
    judge_math,
)

KINDS = ("math", "exact", "gym")


class AccuracyReward(RewardFunction):
    """1.0 for a correct final answer, 0.0 for a wrong or missing one, None if not judged.

    `template_hint` is passed to `extract_answer` ("r1-zero": only the answer tag counts;
    "r1-chat": the last box of the summary first).
    """

    def __init__(
        self, kind: str = "math", template_hint: str | None = None, name: str = "accuracy"
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        super().__init__(name)
        self.kind, self.template_hint = kind, template_hint
        self._tasks: dict[str, Task] = {}

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        answer: list[Any] | None = None,
        task: list[Any] | None = None,
        verify: list[Callable | None] | None = None,
        meta: list[dict | None] | None = None,
        **_: Any,
    ) -> RewardResult:
        if answer is None:
            raise ValueError(
                f"reward {self.__name__} needs an `answer` column with the reference answers"
            )
        scores, reasons = [], []
        for i, completion in enumerate(completions):
            verdict = self._judge_one(
                prompts[i],
                completion,
                answer[i],
                task[i] if task is not None else None,
                verify[i] if verify is not None else None,
                meta[i] if meta is not None else None,
            )
            scores.append(verdict.score)
            reasons.append(verdict.reason)
        return RewardResult(scores, reasons)

    def _judge_one(
        self, prompt: str, completion: str, reference: Any, task: Any, verify: Any, meta: Any
    ) -> Verdict:
        if reference is None or not str(reference).strip():
            return Verdict(None, "no reference answer")
        reference = str(reference).strip()
        predicted = extract_answer(completion, self.template_hint, prefilled=prefills_think(prompt))
        if predicted is None:
            return Verdict(0.0, "no answer")
        if not predicted:
            return Verdict(0.0, "empty answer")
        if is_multiple_answers(predicted, reference):
            return Verdict(0.0, "multiple answers")
        if verify is not None:
            return _call(lambda: verify(predicted, reference), "verify")
        if task is not None:
            return self._judge_with_task(task, predicted, reference, meta)
        if self.kind == "exact":
            return judge_exact(predicted, reference)
        if self.kind == "gym":
            return self._judge_with_task("gym", predicted, reference, meta)
        return judge_math(predicted, reference)

    def _judge_with_task(self, task: Any, predicted: str, reference: str, meta: Any) -> Verdict:
        if isinstance(task, str):
            if task not in self._tasks:
                try:
                    self._tasks[task] = get_task(task)
                except Exception as e:  # noqa: BLE001
                    return Verdict(None, f"task {task!r} unavailable: {e}"[:300])
            task = self._tasks[task]
        example = Example(question="", answer=reference, meta=dict(meta or {}))
        return _call(lambda: task.judge(predicted, reference, example), task.name)


def _call(check: Callable[[], Any], what: str) -> Verdict:
    """Run a checker; a bool/number becomes a score, an exception a reasoned None."""
    try:
        result = check()
    except Exception as e:  # noqa: BLE001  (a broken checker is not a wrong answer)
        return Verdict(None, f"{what} failed: {type(e).__name__}: {e}"[:300])
    if isinstance(result, Verdict):
        return result
    if isinstance(result, bool):
        return Verdict(1.0 if result else 0.0)
    try:
        return Verdict(float(result))
    except (TypeError, ValueError):
        return Verdict(None, f"{what} returned {type(result).__name__}, not a bool or number")


@register_reward("accuracy")
def make_accuracy_reward(kind: str = "math", template_hint: str | None = None) -> AccuracyReward:
    """A fresh accuracy reward (its own task cache)."""
    return AccuracyReward(kind=kind, template_hint=template_hint)
