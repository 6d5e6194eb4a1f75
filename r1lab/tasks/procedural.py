"""Procedural tasks: splits of the families' question space, worked problems, and the tasks.

The from-scratch model's whole world (families in `r1lab.tasks.families`, corpora in
`r1lab.tasks.corpus`): the pretraining corpus, the cold-start SFT data, RL prompts and the
held-out evaluation all come from here. `zh_fraction` sets the share of Chinese questions,
so a language-consistency reward has something to measure.

Train and test are a fixed split of the question space (a hash of the canonical problem,
independent of wording and language, 10% test), so held-out questions never appear in any
training corpus built from the train split.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from r1lab.tasks.base import Example, Task, register_task
from r1lab.tasks.families import (
    FAMILIES,
    FAMILY_NAMES,
    LEVELS,
    SPLITS,
    TEST_FRACTION,
    Family,
    Pad,
    Problem,
    Solution,
)

# --- splits and drawing ------------------------------------------------------------------


def split_of(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """'test' for a fixed share of canonical problems, 'train' for the rest."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def _as_tuple(value: str | int | Sequence) -> tuple:
    return (value,) if isinstance(value, (str, int)) else tuple(value)


def _check_options(families: tuple, levels: tuple, split: str, zh_fraction: float) -> None:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; known families: {', '.join(FAMILY_NAMES)}")
    if not levels or any(level not in LEVELS for level in levels):
        raise ValueError(f"levels must be among {LEVELS}, got {levels}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= zh_fraction <= 1.0:
        raise ValueError(f"zh_fraction must be in [0, 1], got {zh_fraction}")


_GIVE_UP = 3000


def draw_problems(
    families: str | Sequence[str],
    n: int,
    seed: int,
    *,
    levels: int | Sequence[int] = (1,),
    split: str = "train",
    unique: bool = False,
    stream: str = "",
) -> list[Problem]:
    """`n` problems of the split, families and levels drawn uniformly; reproducible by seed.

    With `unique`, no canonical problem repeats; when a small question space runs out
    (`_GIVE_UP` draws in a row bring nothing new) the list comes back shorter, with a warning.
    """
    families, levels = _as_tuple(families), _as_tuple(levels)
    _check_options(families, levels, split, 0.0)
    rng = random.Random(f"{seed}:{stream}:{split}:{','.join(families)}:{levels}")
    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0
    while len(problems) < n and misses < _GIVE_UP:
        family = FAMILIES[rng.choice(families)]
        problem = family.sample(rng, rng.choice(levels))
        if split_of(problem.key) != split or (unique and problem.key in seen):
            misses += 1
            continue
        misses = 0
        seen.add(problem.key)
        problems.append(problem)
    if len(problems) < n:
        warnings.warn(
            f"only {len(problems)} distinct {split} problems found for {families} at levels "
            f"{levels} (asked for {n})",
            stacklevel=2,
        )
    return problems


@dataclass
class WorkedProblem:
    """A problem with its wording, language and clean solution, as the writers use it."""

    problem: Problem
    family: Family
    lang: str
    question: str
    solution: Solution

    def example(self) -> Example:
        meta = {
            "family": self.problem.family,
            "level": self.problem.level,
            "language": self.lang,
            "reasoning": list(self.solution.steps),
            "key": self.problem.key,
            "split": split_of(self.problem.key),
            **self.family.meta(self.problem),
        }
        return Example(self.question, self.solution.answer, meta)


def worked_problems(
    families: str | Sequence[str],
    n: int,
    seed: int,
    *,
    levels: int | Sequence[int] = (1,),
    split: str = "train",
    zh_fraction: float = 0.0,
    unique: bool = False,
    stream: str = "",
) -> list[WorkedProblem]:
    """Problems with a language, a wording and a clean solution each.

    `stream` names the caller so that, for one seed, the pretraining corpus, the SFT data
    and the RL prompts are independent draws.
    """
    families, levels = _as_tuple(families), _as_tuple(levels)
    _check_options(families, levels, split, zh_fraction)
    problems = draw_problems(
        families, n, seed, levels=levels, split=split, unique=unique, stream=stream
    )
    rng = random.Random(f"{seed}:{stream}:surface")
    items = []
    for problem in problems:
        family = FAMILIES[problem.family]
        lang = "zh" if rng.random() < zh_fraction else "en"
        question = family.question(problem, lang, rng)
        items.append(
            WorkedProblem(problem, family, lang, question, family.solve(problem, lang, Pad()))
        )
    return items


def reasoning_steps(
    item: WorkedProblem, lang: str, mode: str, rng: random.Random
) -> tuple[list[str], str]:
    """Steps and final answer for one way of working a problem.

    mode: "clean"; "flawed" (one wrong step carried to a wrong answer); "check" (clean, then
    a verification that passes); "correct" (a wrong step, a verification that catches it,
    and the clean solution).
    """
    fam, problem = item.family, item.problem
    clean = fam.solve(problem, lang, Pad())
    if mode == "clean":
        return clean.steps, clean.answer
    if mode == "check":
        text, ok = fam.check(problem, clean.answer, lang)
        assert ok
        return [*clean.steps, text], clean.answer
    flawed = fam.solve(problem, lang, Pad(fam.slip(problem, rng)))
    if flawed.answer == clean.answer:  # the slip cancelled out; nothing to show
        return clean.steps, clean.answer
    if mode == "flawed":
        return flawed.steps, flawed.answer
    if mode == "correct":
        text, ok = fam.check(problem, flawed.answer, lang)
        assert not ok
        return [*flawed.steps, text, *clean.steps], clean.answer
    raise ValueError(f"unknown reasoning mode {mode!r}")


# --- tasks --------------------------------------------------------------------------------


class ProceduralTask(Task):
    """Examples from one or more procedural families.

    Options: `levels` (1..3, one or several), `zh_fraction` (share of Chinese questions).
    Test examples are distinct; train examples may repeat a problem.
    """

    name = "procedural"
    families: tuple[str, ...] = FAMILY_NAMES

    def __init__(self, levels: int | Sequence[int] = (1,), zh_fraction: float = 0.0):
        self.levels = _as_tuple(levels)
        self.zh_fraction = zh_fraction
        _check_options(self.families, self.levels, "train", zh_fraction)

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Example]:
        n = 500 if n is None else n
        items = worked_problems(
            self.families,
            n,
            seed,
            levels=self.levels,
            split=split,
            zh_fraction=self.zh_fraction,
            unique=split == "test",
            stream="examples",
        )
        return [item.example() for item in items]

    def verify(self, predicted: str, reference: str, example: Example | None = None) -> bool:
        meta = example.meta if example is not None else {}
        family = meta.get("family") or (self.families[0] if len(self.families) == 1 else None)
        if family is None:  # a mixture without the example: a number, or a countdown expression
            fallbacks = (FAMILIES["chain_sum"], FAMILIES["countdown"])
            return any(f.verify(predicted, reference) for f in fallbacks)
        return FAMILIES[family].verify(predicted, reference, meta)


register_task("procedural")(ProceduralTask)


def _family_task(family: str) -> type[ProceduralTask]:
    """The task of one procedural family, registered under the family's own name."""
    title = "".join(part.title() for part in family.split("_"))
    cls = type(f"{title}Task", (ProceduralTask,), {"name": family, "families": (family,)})
    return register_task(family)(cls)


for _family in FAMILY_NAMES:
    _family_task(_family)
