"""Code reward: run the completion's program against the problem's tests in a sandbox.

The program is the last fenced code block (```python ... ``` or a bare ``` fence) of the
summary, the text after the reasoning (`</think>`); a completion with no such block, or
whose reasoning never closes, scores 0.0 with the reason "no code". The program runs with
`r1lab.sandbox.run_candidate` (its own process, time, memory and process limits, no
network, a private directory), candidates in parallel on `workers` processes.

Columns, one entry per completion: `tests` (code that raises on failure: a
`check(candidate)` function as in HumanEval, or top-level asserts) and `entry_point` (the
function the tests call). Either may instead come from the `meta` column's dicts (as code
tasks put them there), with an optional `prelude` (the problem's imports and helpers, run
before the program).

The score is the fraction of tests passed (`all_or_nothing=False`) or 1.0 / 0.0
(`all_or_nothing=True`, the default, as the paper's rule-based reward). Every score below
1 has its reason: "no code", "syntax error: ...", "timeout: ...", "memory limit: ...",
"process limit: ...", "runtime error: ...", "wrong answer: <the failing assert>",
"no function: ...". A sandbox failure (not the candidate's) is None with its reason.
"""

from __future__ import annotations

import re
from typing import Any

from r1lab.rewards.base import RewardFunction, RewardResult, prefills_think, register_reward
from r1lab.sandbox import Limits, run_candidates
from r1lab.tasks.answers import split_think

NO_CODE = "no code"
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|```)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3"}


def extract_code(completion: str, prefilled: bool = False) -> str | None:
    """The last fenced Python block of the summary, or None when there is none.

    Only the text outside the reasoning counts, and only when the reasoning is closed (an
    unclosed `<think>` means the model never got to its answer). A fence tagged with
    another language (```text, ```bash) is not a program.
    """
    parts = split_think(completion, prefilled=prefilled)
    if not parts.closed:
        return None
    blocks = [
        body
        for tag, body in _FENCE.findall(parts.outside)
        if tag.lower() in _PYTHON_TAGS and body.strip()
    ]
    return blocks[-1] if blocks else None


class CodeReward(RewardFunction):
    """Runs each completion's program against its tests; see the module docstring."""

    def __init__(
        self,
        all_or_nothing: bool = True,
        limits: Limits | None = None,
        workers: int | None = None,
        name: str = "code",
    ):
        super().__init__(name)
        self.all_or_nothing = all_or_nothing
        self.limits = limits or Limits()
        self.workers = workers

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        tests: list[str | None] | None = None,
        entry_point: list[str | None] | None = None,
        meta: list[dict | None] | None = None,
        **_: Any,
    ) -> RewardResult:
        n = len(completions)
        metas = [dict(m or {}) for m in meta] if meta is not None else [{} for _ in range(n)]
        tests = tests if tests is not None else [m.get("tests") for m in metas]
        entry_point = (
            entry_point if entry_point is not None else [m.get("entry_point") for m in metas]
        )
        scores: list[float | None] = [0.0] * n
        reasons: list[str | None] = [None] * n
        jobs, where = [], []
        for i, completion in enumerate(completions):
            if not tests[i] or not str(tests[i]).strip():
                scores[i], reasons[i] = None, "no tests for this problem"
                continue
            code = extract_code(completion, prefilled=prefills_think(prompts[i]))
            if code is None:
                reasons[i] = NO_CODE
                continue
            jobs.append(
                {
                    "code": code,
                    "tests": str(tests[i]),
                    "entry_point": entry_point[i] or None,
                    "prelude": metas[i].get("prelude") or "",
                }
            )
            where.append(i)
        for i, result in zip(where, run_candidates(jobs, self.limits, self.workers)):
            if not result.judged:
                scores[i], reasons[i] = None, result.reason
            elif result.ok:
                scores[i] = 1.0
            else:
                fraction = result.passed / result.total if result.total else 0.0
                scores[i] = 0.0 if self.all_or_nothing else fraction
                reasons[i] = result.reason
        return RewardResult(scores, reasons)


@register_reward("code")
def make_code_reward(
    all_or_nothing: bool = True,
    wall_s: float = 10.0,
    cpu_s: int = 5,
    memory_mb: int = 1024,
    max_procs: int = 32,
    workers: int | None = None,
) -> CodeReward:
    """A code reward with its sandbox limits (seconds, MiB, processes) and pool size."""
    limits = Limits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb, max_procs=max_procs)
    return CodeReward(all_or_nothing=all_or_nothing, limits=limits, workers=workers)


def code_reward(prompts: list, completions: list[str], **columns: Any) -> RewardResult:
    """The code reward with its defaults (all-or-nothing, a pool the size of the machine)."""
    return CodeReward()(prompts, completions, **columns)
