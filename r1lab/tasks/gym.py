"""reasoning-gym families as tasks: `get_task("gym", family="chain_sum", size=..., seed=...)`.

reasoning-gym generates verifiable problems procedurally (arithmetic, logic, puzzles,
graphs, ...), each family with its own scorer. It is an optional dependency
(`pip install 'r1lab[gym]'`), imported only when a gym task is built or judged.
Difficulty options are the family's config fields (for chain_sum: `min_terms`,
`max_terms`, `min_digits`, `max_digits`, ...) passed as keyword arguments.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

from r1lab.tasks.answers import Verdict
from r1lab.tasks.base import Example, Task, register_task


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "reasoning-gym tasks need the reasoning-gym package: "
            "pip install 'r1lab[gym]' (or pip install reasoning-gym)"
        ) from e
    return reasoning_gym


@functools.cache
def _default_scorer(family: str):
    # Scoring needs no generated data, only the family's own rule; build it once.
    return _reasoning_gym().get_score_answer_fn(family)


@register_task("gym")
class GymTask(Task):
    """One reasoning-gym family. Example.meta carries the family and the full entry
    (question, answer, metadata) because some scorers need the metadata."""

    def __init__(self, family: str | None = None, size: int = 1000, seed: int = 0, **options: Any):
        self.family, self.size, self.seed, self.options = family, size, seed, options
        self.name = f"gym/{family}" if family else "gym"
        self._datasets: dict[tuple[str, int, int], Any] = {}
        if family is not None:
            _reasoning_gym()
            from reasoning_gym.factory import DATASETS

            if family not in DATASETS:
                known = ", ".join(sorted(DATASETS))
                raise KeyError(f"unknown reasoning-gym family {family!r}; known: {known}")

    def _dataset(self, split: str, n: int, seed: int):
        key = (split, n, seed)
        if key not in self._datasets:
            if self.family is None:
                raise ValueError("a gym task needs family=... to generate examples")
            # Splits and seeds map to disjoint generator seeds, so train and test differ.
            data_seed = zlib.crc32(f"{self.seed}/{split}/{seed}".encode()) & 0x7FFFFFFF
            try:
                self._datasets[key] = _reasoning_gym().create_dataset(
                    self.family, size=n, seed=data_seed, **self.options
                )
            except TypeError as e:
                raise ValueError(
                    f"bad options for reasoning-gym family {self.family!r}: {e}"
                ) from e
        return self._datasets[key]

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Example]:
        """`n` (default `size`) generated problems; the same split and seed give the same ones."""
        n = self.size if n is None else n
        if n <= 0:
            return []
        dataset = self._dataset(split, n, seed)
        return [
            Example(
                question=entry["question"],
                answer=str(entry["answer"]),
                meta={"source": self.name, "family": self.family, "entry": entry},
            )
            for entry in dataset
        ]

    def judge(self, predicted: str, reference: str, example: Example | None = None) -> Verdict:
        """The family's own `score_answer` (a float in [0, 1]); None if the scorer fails."""
        meta = example.meta if example is not None else {}
        family = meta.get("family") or self.family
        if family is None:
            return Verdict(None, "gym: no family given (task option or example.meta['family'])")
        entry = meta.get("entry") or {"question": "", "answer": reference, "metadata": {}}
        try:
            score = self._scorer(family)(predicted, entry)
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001  (a scorer bug is not the model's fault)
            return Verdict(None, f"gym scorer {family} failed: {type(e).__name__}: {e}"[:300])
        return Verdict(float(score))

    def _scorer(self, family: str):
        # The generating dataset's own scorer (it knows its config); else the default one.
        if family == self.family and self._datasets:
            return next(iter(self._datasets.values())).score_answer
        return _default_scorer(family)

    def verify(self, predicted: str, reference: str, example: Example | None = None) -> bool:
        return self.judge(predicted, reference, example).correct
