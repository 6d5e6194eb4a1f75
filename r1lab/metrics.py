"""Evaluation metrics as pure functions over per-sample results.

Shared by the evaluation stage, GRPO's periodic evaluation and the report, so that every
number called "pass@1" in r1lab is computed the same way.

Inputs are nested lists: one inner list per question, one entry per sample of it, in the
order they were sampled. The protocol (R1_RECIPE.md, evaluation): k samples per question
at temperature 0.6 / top-p 0.95; pass@1 is the mean correctness over those k samples;
cons@k is the accuracy of the majority-vote answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

FINISH_LENGTH = "length"


def _check_counts(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample per question, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: the number correct c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass@k: k={k} must be in [1, n={n}] (cannot draw more than were sampled)"
        )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct.

    The chance that at least one of k samples drawn without replacement from the n is
    correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021). The ratio of binomials is written
    as the product prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    _check_counts(n, c, k)
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def _check_grid(correct: Sequence[Sequence[bool]]) -> None:
    if len(correct) == 0:
        raise ValueError("no questions to score")
    empty = [i for i, row in enumerate(correct) if len(row) == 0]
    if empty:
        raise ValueError(f"question {empty[0]} has no samples")


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over questions (each question may have its own number of samples)."""
    _check_grid(correct)
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def mean_pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """The paper's pass@1: per question the share of correct samples, averaged over questions."""
    _check_grid(correct)
    return sum(sum(map(bool, row)) / len(row) for row in correct) / len(correct)


def pass_at_1_stderr(correct: Sequence[Sequence[bool]]) -> float:
    """Standard error of `mean_pass_at_1` over questions (0 for a single question).

    Questions are the sampling unit: two checkpoints whose pass@1 differ by less than
    about two of these are not told apart by this evaluation.
    """
    _check_grid(correct)
    return question_mean_stderr([[float(bool(x)) for x in row] for row in correct])


def question_mean(values: Sequence[Sequence[float]]) -> float:
    """Per question the mean of its samples' values, then the mean over questions."""
    _check_grid(values)
    return sum(sum(row) / len(row) for row in values) / len(values)


def question_mean_stderr(values: Sequence[Sequence[float]]) -> float:
    """Standard error of `question_mean`, questions as the sampling unit (0 for one question).

    Used for every per-sample quantity the findings compare (correctness, format, length,
    self-checks): the k samples of one question are not independent, the questions are.
    """
    _check_grid(values)
    per_question = [sum(row) / len(row) for row in values]
    m = len(per_question)
    if m < 2:
        return 0.0
    mean = sum(per_question) / m
    var = sum((x - mean) ** 2 for x in per_question) / (m - 1)
    return math.sqrt(var / m)


# --- self-checks --------------------------------------------------------------------------

# Phrases that mark a response re-examining its own work, in the two languages of the
# procedural tasks: the "aha" behaviour of R1-Zero (re-check, verify, catch a mistake,
# redo). Lower-cased substring matches; "wait" alone counts, as in the paper's example.
SELF_CHECK_PHRASES = (
    "wait",
    "verify",
    "check",  # check, re-check, double-check, checks out
    "let me redo",
    "mistake",
    "等等",
    "验算",
    "检查",
    "重新计算",
    "算错",
)


def is_self_check(text: str) -> bool:
    """Does `text` verify or revise its own work (any of `SELF_CHECK_PHRASES`)?"""
    lowered = text.lower()
    return any(phrase in lowered for phrase in SELF_CHECK_PHRASES)


# --- majority vote ------------------------------------------------------------------------


def _exact(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def answer_groups(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = _exact
) -> list[list[int]]:
    """Sample indices grouped by equivalent answers, groups in order of first appearance.

    An answer joins the first group whose representative (its first member) it is
    equivalent to, asked as `equivalent(representative, answer)`; identical strings join
    without asking, which keeps the number of (possibly slow) checks small. Comparing with
    the representative only makes the grouping deterministic even when the check is not
    transitive. None answers belong to no group.
    """
    groups: list[list[int]] = []
    reps: list[str] = []
    by_text: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        key = answer.strip()
        g = by_text.get(key)
        if g is None:
            g = next((j for j, rep in enumerate(reps) if equivalent(rep, answer)), None)
        if g is None:
            g = len(groups)
            groups.append([])
            reps.append(answer)
        by_text.setdefault(key, g)
        groups[g].append(i)
    return groups


def majority_vote(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = _exact
) -> int | None:
    """Index of the sample that speaks for the majority answer, or None when no sample answered.

    The winner is the largest group of equivalent answers; a tie goes to the group whose
    first answer was sampled earliest (deterministic, and independent of answer text).
    The returned index is that group's first sample, whose correctness is the vote's.
    """
    groups = answer_groups(answers, equivalent)
    if not groups:
        return None
    best = max(groups, key=lambda g: (len(g), -g[0]))
    return best[0]


def cons_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]],
    equivalent: Callable[[str, str], bool] = _exact,
) -> float:
    """Majority-vote accuracy: the share of questions whose majority answer is correct.

    `equivalent(a, b)` should be the task's own check (so "0.5" and "1/2" vote together
    for a math task); the default is string equality. None answers never win; a question
    where no sample answered counts as wrong. See `majority_vote` for ties.
    """
    _check_grid(correct)
    if len(answers) != len(correct):
        raise ValueError(f"answers has {len(answers)} questions but correct has {len(correct)}")
    hits = sum(majority_correct(a, c, equivalent) for a, c in zip(answers, correct))
    return hits / len(correct)


def majority_correct(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[str, str], bool] = _exact,
) -> bool:
    """Whether one question's majority-vote answer is correct (False when nothing answered).

    Callers whose equivalence depends on the question (a task's check given its example)
    vote question by question with this and average, which is `cons_at_k`.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    winner = majority_vote(answers, equivalent)
    return winner is not None and bool(correct[winner])


# --- aggregates ---------------------------------------------------------------------------


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the judged values (None = not judged); None when nothing was judged."""
    judged = [float(v) for v in values if v is not None]
    return sum(judged) / len(judged) if judged else None


def rate(flags: Sequence[bool]) -> float:
    """Share of True flags (0 for an empty list, so an empty breakdown reads as nothing)."""
    return sum(map(bool, flags)) / len(flags) if flags else 0.0


def truncation_rate(finish_reasons: Sequence[str]) -> float:
    """Share of completions cut by the length budget rather than ending on their own."""
    return rate([r == FINISH_LENGTH for r in finish_reasons])


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, median and maximum response length (tokens)."""
    if not lengths:
        return {"mean": 0.0, "median": 0.0, "max": 0}
    ordered = sorted(lengths)
    m = len(ordered)
    median = ordered[m // 2] if m % 2 else (ordered[m // 2 - 1] + ordered[m // 2]) / 2
    return {"mean": sum(ordered) / m, "median": float(median), "max": ordered[-1]}
