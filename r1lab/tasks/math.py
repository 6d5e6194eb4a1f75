"""Math benchmarks (GSM8K, MATH-500, AIME 2024, AMC 2023) and any jsonl/parquet file.

Each benchmark loads from the Hugging Face hub by default (through `datasets`, the
optional `r1lab[hub]` extra) or from a local file given as `path=`: `.jsonl` (one JSON
object a line), `.json` (an array of objects, or JSON lines) or `.parquet`. Bad data is
reported where it is, with the file, the line (or row) and the field, because a wrong
reference silently poisons every reward computed against it.

Answers are judged with `r1lab.tasks.answers.judge_math` (math-verify behind a cheap
string check).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

from r1lab.rows import DataError, Row, kind_name, read_rows
from r1lab.rows import read_hub_rows as read_dataset_rows
from r1lab.tasks.answers import Verdict, judge_exact, judge_math
from r1lab.tasks.base import Example, Task, register_task

logger = logging.getLogger(__name__)

__all__ = ["DataError", "read_rows"]  # re-exported: loaders and tests import them from here


def read_hub_rows(hub_id: str, config: str | None, split: str, task: str) -> list[Row]:
    """Rows of a Hugging Face hub dataset split (needs the optional `datasets`)."""
    try:
        return read_dataset_rows(hub_id, config, split, needed_by=f"task {task!r}")
    except ImportError as err:
        raise ImportError(f"{err} (the task's path= option)") from err


# --- turning fields into text ---------------------------------------------------------


def field_text(row: Row, names: str | tuple[str, ...]) -> str:
    """The first present, non-empty field among `names`, as text; DataError otherwise."""
    where, fields = row
    names = (names,) if isinstance(names, str) else names
    for name in names:
        value = fields.get(name)
        if value is None:
            continue
        text = scalar_text(value, where, name)
        if text:
            return text
    wanted = " or ".join(repr(n) for n in names)
    present = ", ".join(sorted(fields)) or "none"
    if any(n in fields for n in names):
        raise DataError(f"{where}: field {wanted} is empty or null")
    raise DataError(f"{where}: missing field {wanted} (fields present: {present})")


def scalar_text(value: Any, where: str, name: str) -> str:
    """A string or number field as text: 27.0 -> "27", 2.5 -> "2.5", " x " -> "x"."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} must be text or a number, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: field {name!r} is not a finite number ({value})")
        return str(int(value)) if value.is_integer() else repr(value)
    raise DataError(f"{where}: field {name!r} must be text or a number, got {kind_name(value)}")


def subset(items: list, n: int | None, seed: int) -> list:
    """All items (n=None) or a seeded sample of n of them, kept in source order."""
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# --- tasks ----------------------------------------------------------------------------


class MathTask(Task):
    """A task whose answers are mathematical expressions, judged with math-verify."""

    def judge(self, predicted: str, reference: str, example: Example | None = None) -> Verdict:
        """Score with reason; `None` score when the checker failed (see `judge_math`)."""
        return judge_math(predicted, reference)

    def verify(self, predicted: str, reference: str, example: Example | None = None) -> bool:
        verdict = self.judge(predicted, reference, example)
        if verdict.score is None:  # counted as not equal, but never silently
            logger.warning("%s: answer %r not judged: %s", self.name, predicted, verdict.reason)
        return verdict.correct


class Benchmark(MathTask):
    """A fixed benchmark: hub id and field names, or a local file in the same layout."""

    hub_id: str = ""
    hub_config: str | None = None
    hub_splits: dict[str, str] = {"test": "test"}  # our split name -> the hub's
    question_fields: tuple[str, ...] = ("problem",)
    answer_field: str = "answer"
    meta_fields: dict[str, str] = {}  # meta key -> source field

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Example]:
        """Examples of `split` (a local `path` is the data whatever the split)."""
        key = "file" if self.path is not None else split
        if key not in self._cache:
            self._cache[key] = [self.to_example(row) for row in self._rows(split)]
        return subset(self._cache[key], n, seed)

    def _rows(self, split: str) -> list[Row]:
        if self.path is not None:
            return read_rows(self.path)
        if split not in self.hub_splits:
            known = ", ".join(sorted(self.hub_splits))
            raise ValueError(f"task {self.name!r} has no split {split!r}; splits: {known}")
        return read_hub_rows(self.hub_id, self.hub_config, self.hub_splits[split], self.name)

    def to_example(self, row: Row) -> Example:
        question = field_text(row, self.question_fields)
        answer = self.parse_answer(field_text(row, self.answer_field), row[0])
        meta: dict[str, Any] = {"source": self.name}
        for key, source in self.meta_fields.items():
            if row[1].get(source) is not None:
                meta[key] = row[1][source]
        return Example(question=question, answer=answer, meta=meta)

    def parse_answer(self, raw: str, where: str) -> str:
        """The reference answer from the raw field (hook for dataset-specific forms)."""
        return raw


@register_task("gsm8k")
class GSM8K(Benchmark):
    """Grade-school word problems; the reference is the number after `####`."""

    name = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    hub_splits = {"train": "train", "test": "test"}
    question_fields = ("question",)

    def to_example(self, row: Row) -> Example:
        example = super().to_example(row)
        example.meta["solution"] = field_text(row, "answer").rsplit("####", 1)[0].strip()
        return example

    def parse_answer(self, raw: str, where: str) -> str:
        if "####" not in raw:
            raise DataError(f"{where}: field 'answer' has no final '#### <number>' line")
        final = raw.rsplit("####", 1)[1].strip().replace(",", "").removeprefix("$").strip()
        if not final:
            raise DataError(f"{where}: field 'answer' has nothing after '####'")
        return final


@register_task("math500")
class Math500(Benchmark):
    """The 500-problem MATH test subset (PRM800K split); LaTeX references."""

    name = "math500"
    hub_id = "HuggingFaceH4/MATH-500"
    meta_fields = {
        "subject": "subject",
        "level": "level",
        "id": "unique_id",
        "solution": "solution",
    }


@register_task("aime24")
class AIME24(Benchmark):
    """AIME 2024 I and II: 30 problems, integer answers 0-999."""

    name = "aime24"
    hub_id = "HuggingFaceH4/aime_2024"
    hub_splits = {"test": "train"}  # the hub copy names its only split "train"
    meta_fields = {"id": "id", "solution": "solution", "url": "url"}

    def parse_answer(self, raw: str, where: str) -> str:
        # Written with leading zeros ("025") as on the answer sheet; the value is 25.
        return str(int(raw)) if raw.isdigit() else raw


@register_task("amc23")
class AMC23(Benchmark):
    """AMC 2023: 40 problems; the hub copy stores answers as floats (27.0)."""

    name = "amc23"
    hub_id = "math-ai/amc23"
    question_fields = ("question", "problem")
    meta_fields = {"id": "id", "url": "url"}


@register_task("jsonl")
class JsonlTask(MathTask):
    """Any local file of questions and answers: `get_task("jsonl", path=...)`.

    `kind` is "math" (math-verify) or "exact" (string match after normalisation). Fields
    other than the question and answer are kept in `Example.meta`.
    """

    def __init__(
        self,
        path: str | Path,
        question_field: str = "question",
        answer_field: str = "answer",
        kind: str = "math",
        name: str | None = None,
    ):
        if kind not in ("math", "exact"):
            raise ValueError(f"kind must be 'math' or 'exact', got {kind!r}")
        self.path = Path(path)
        self.question_field, self.answer_field = question_field, answer_field
        self.kind = kind
        self.name = name or self.path.stem
        self._examples: list[Example] | None = None

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Example]:
        """Examples of the file (one file is one split, whatever `split` says)."""
        if self._examples is None:
            self._examples = [self._to_example(row) for row in read_rows(self.path)]
        return subset(self._examples, n, seed)

    def _to_example(self, row: Row) -> Example:
        question = field_text(row, self.question_field)
        answer = field_text(row, self.answer_field)
        meta = {
            k: v for k, v in row[1].items() if k not in (self.question_field, self.answer_field)
        }
        meta["source"] = self.name
        return Example(question=question, answer=answer, meta=meta)

    def judge(self, predicted: str, reference: str, example: Example | None = None) -> Verdict:
        if self.kind == "exact":
            return judge_exact(predicted, reference)
        return judge_math(predicted, reference)
