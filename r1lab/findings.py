"""The paper's four findings, checked on a run directory's own evaluation results.

Each finding is a set of criteria over the held-out evaluations the pipeline wrote
(`<run>/eval/<stage>/eval.json`). A criterion compares figures that carry standard errors
(questions are the sampling unit, `metrics.question_mean_stderr`); a difference counts
only when it exceeds `SIGNIFICANCE` standard errors of the difference. A finding holds when
every one of its criteria does. Nothing here is written by hand: the report prints what
`check_findings` computes.

1. R1-Zero discovers reasoning (base -> r1-zero, all held-out sets pooled): the format
   rate rises from at most 50% to at least 90%; pass@1 starts between 15% and 60% and
   rises by at least 15 points; the mean response length grows at least 1.5x; the share
   of answers that verify or revise their work (`metrics.is_self_check`) rises.
2. Readability (the Chinese held-out sets): R1-Zero reasons there (its answers at least
   1.5x the base's length) and its language consistency is below 90%; reasoning RL with
   the language-consistency reward brings it to at least 98%, with pass@1 no more than 2
   points below R1-Zero's.
3. R1 beats R1-Zero: general-rl's pooled pass@1 is above r1-zero's.
4. Distillation beats RL on the small model: distill's pass@1 is above student-rl's on
   every held-out set (each language).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from r1lab.rewards.language import detect_language

SIGNIFICANCE = 2.0  # a difference counts beyond this many standard errors
LENGTH_GROWTH = 1.5  # how much longer answers must grow for a model to count as reasoning


@dataclass(frozen=True)
class Figure:
    """A mean with its standard error (0 when the source has none)."""

    value: float
    stderr: float = 0.0

    def minus(self, other: Figure) -> Figure:
        return Figure(self.value - other.value, math.hypot(self.stderr, other.stderr))

    def show(self, percent: bool = True) -> str:
        scale = 100.0 if percent else 1.0
        return f"{scale * self.value:.1f} ± {scale * self.stderr:.1f}"


@dataclass
class Criterion:
    text: str  # what is required, in words
    measured: str  # the figures it was decided on
    holds: bool


@dataclass
class Finding:
    title: str
    criteria: list[Criterion] = field(default_factory=list)
    missing: str | None = None  # why it could not be checked (a stage not evaluated)

    @property
    def holds(self) -> bool:
        return self.missing is None and bool(self.criteria) and all(c.holds for c in self.criteria)

    @property
    def verdict(self) -> str:
        if self.missing:
            return f"not checked ({self.missing})"
        return "holds" if self.holds else "does not hold"


# ---- reading the run dir ------------------------------------------------------------------------
def eval_sets(run_dir: Path, stage: str) -> dict[str, dict] | None:
    """The per-set results of a stage's evaluation, or None when it was not evaluated."""
    path = Path(run_dir) / "eval" / stage / "eval.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if "sets" in result and isinstance(result["sets"], dict):
        return result["sets"]
    return {result.get("task", "heldout"): result}


def set_language(result: dict) -> str | None:
    """The script of a held-out set ("cjk", "latin"), read off its shown questions (None when mixed)."""
    languages = {detect_language(s.get("question", "")) for s in result.get("samples", [])}
    return languages.pop() if len(languages) == 1 else None


def figure(result: dict, key: str) -> Figure | None:
    value = result.get(key)
    if value is None:
        return None
    return Figure(float(value), float(result.get(f"{key}_stderr") or 0.0))


def pooled(results: list[dict], key: str) -> Figure | None:
    """The mean over held-out sets of a figure, with the standard error of that mean."""
    figures = [figure(r, key) for r in results]
    if not figures or any(f is None for f in figures):
        return None
    n = len(figures)
    return Figure(
        sum(f.value for f in figures) / n, math.sqrt(sum(f.stderr**2 for f in figures)) / n
    )


# ---- criteria -----------------------------------------------------------------------------------
def at_least(name: str, fig: Figure, bound: float) -> Criterion:
    return Criterion(f"{name} >= {100 * bound:.0f}%", fig.show(), fig.value >= bound)


def at_most(name: str, fig: Figure, bound: float) -> Criterion:
    return Criterion(f"{name} <= {100 * bound:.0f}%", fig.show(), fig.value <= bound)


def below(name: str, fig: Figure, bound: float) -> Criterion:
    return Criterion(f"{name} < {100 * bound:.0f}%", fig.show(), fig.value < bound)


def rises(name: str, before: Figure, after: Figure, *, by: float = 0.0, percent=True) -> Criterion:
    """`after` above `before` by more than SIGNIFICANCE standard errors, and by at least `by`."""
    diff = after.minus(before)
    beyond_noise = diff.value > SIGNIFICANCE * diff.stderr
    scale = 100.0 if percent else 1.0
    need = f" by >= {scale * by:.0f} points" if by else ""
    return Criterion(
        f"{name} rises{need}, beyond {SIGNIFICANCE:g} standard errors",
        f"{before.show(percent)} -> {after.show(percent)} (difference {diff.show(percent)})",
        beyond_noise and diff.value >= by,
    )


def grows(name: str, before: Figure, after: Figure, factor: float) -> Criterion:
    diff = after.minus(before)
    ratio = after.value / before.value if before.value > 0 else math.inf
    return Criterion(
        f"{name} grows >= {factor:g}x, beyond {SIGNIFICANCE:g} standard errors",
        f"{before.show(False)} -> {after.show(False)} tokens ({ratio:.2f}x)",
        ratio >= factor and diff.value > SIGNIFICANCE * diff.stderr,
    )


def not_lower(name: str, reference: Figure, other: Figure, slack: float) -> Criterion:
    return Criterion(
        f"{name} no more than {100 * slack:.0f} points below",
        f"{reference.show()} vs {other.show()}",
        other.value >= reference.value - slack,
    )


# ---- the four findings --------------------------------------------------------------------------
def _comparing(title: str, before: str, after: str):
    """Make a judge of two stages' evaluations into a finding of a run dir: the judge gets
    the finding, both stages' per-set results and the run dir, and sets the criteria; when
    either stage was not evaluated, the finding says which instead."""

    def wrap(judge):
        @functools.wraps(judge)
        def finding_of(run_dir: Path) -> Finding:
            finding = Finding(title)
            results = {stage: eval_sets(Path(run_dir), stage) for stage in (before, after)}
            missing = [stage for stage, result in results.items() if not result]
            if missing:
                finding.missing = f"no evaluation of {', '.join(missing)}"
            else:
                judge(finding, results[before], results[after], Path(run_dir))
            return finding

        return finding_of

    return wrap


@_comparing(
    "R1-Zero discovers reasoning (base -> r1-zero, held-out sets pooled)", "base", "r1-zero"
)
def r1_zero_discovers(finding: Finding, base: dict, zero: dict, run_dir: Path) -> None:
    b, z = list(base.values()), [zero[name] for name in base if name in zero]
    figs = {key: (pooled(b, key), pooled(z, key)) for key in
            ("format_rate", "pass@1", "mean_length", "self_check_rate")}  # fmt: skip
    if any(x is None for pair in figs.values() for x in pair):
        finding.missing = "eval.json lacks format, length or self-check figures"
        return
    (fb, fz), (pb, pz) = figs["format_rate"], figs["pass@1"]
    finding.criteria = [
        at_most("base format rate", fb, 0.5),
        at_least("r1-zero format rate", fz, 0.9),
        Criterion("base pass@1 between 15% and 60%", pb.show(), 0.15 <= pb.value <= 0.60),
        rises("pass@1", pb, pz, by=0.15),
        grows("mean response length", *figs["mean_length"], LENGTH_GROWTH),
        rises("self-check rate", *figs["self_check_rate"]),
    ]


@_comparing(
    "Readability: reasoning RL ends R1-Zero's language mixing (Chinese sets)",
    "r1-zero",
    "reasoning-rl",
)
def readability(finding: Finding, zero: dict, rl: dict, run_dir: Path) -> None:
    names = [n for n, r in zero.items() if set_language(r) == "cjk" and n in rl]
    if not names:
        finding.missing = "no Chinese held-out set"
        return
    z, r = [zero[n] for n in names], [rl[n] for n in names]
    lz, lr = pooled(z, "language_consistency"), pooled(r, "language_consistency")
    if lz is None or lr is None:
        finding.missing = "eval.json lacks language consistency"
        return
    # Mixing languages is a property of reasoning: R1-Zero must reason on these questions
    # (its answers grown as finding 1 asks) before its language consistency means anything.
    base = eval_sets(run_dir, "base") or {}
    lb = pooled([base[n] for n in names if n in base], "mean_length")
    if lb is None:
        finding.missing = "no evaluation of base (to tell whether r1-zero reasons)"
        return
    finding.criteria = [
        grows(
            "r1-zero reasons: mean length over the base's",
            lb,
            pooled(z, "mean_length"),
            LENGTH_GROWTH,
        ),  # fmt: skip
        below("r1-zero language consistency", lz, 0.9),
        at_least("reasoning-rl language consistency", lr, 0.98),
        not_lower("reasoning-rl pass@1 vs r1-zero", pooled(z, "pass@1"), pooled(r, "pass@1"), 0.02),
    ]


@_comparing(
    "R1 beats R1-Zero (general-rl vs r1-zero, held-out sets pooled)", "r1-zero", "general-rl"
)
def r1_beats_r1_zero(finding: Finding, zero: dict, final: dict, run_dir: Path) -> None:
    names = [n for n in zero if n in final]
    finding.criteria = [
        rises(
            "pass@1 from r1-zero to general-rl",
            pooled([zero[n] for n in names], "pass@1"),
            pooled([final[n] for n in names], "pass@1"),
        )
    ]


@_comparing(
    "Distillation beats RL on the small model (distill vs student-rl, each set)",
    "student-rl",
    "distill",
)
def distillation_wins(finding: Finding, rl: dict, distilled: dict, run_dir: Path) -> None:
    finding.criteria = [
        rises(
            f"{name}: pass@1 from student-rl to distill",
            figure(rl[name], "pass@1"),
            figure(distilled[name], "pass@1"),
        )  # fmt: skip
        for name in rl
        if name in distilled
    ]


def check_findings(run_dir: str | Path) -> list[Finding]:
    """The four findings, each with its criteria and a verdict, from `run_dir`'s evaluations."""
    run_dir = Path(run_dir)
    return [
        r1_zero_discovers(run_dir),
        readability(run_dir),
        r1_beats_r1_zero(run_dir),
        distillation_wins(run_dir),
    ]


def findings_markdown(findings: list[Finding]) -> list[str]:
    """The report's Findings section: a verdict per finding, then its criteria."""
    lines = [
        "## Findings",
        "",
        f"Each computed from this run's held-out evaluations; ± is one standard error over "
        f"questions, and a difference counts only beyond {SIGNIFICANCE:g} standard errors "
        "(r1lab/findings.py).",
        "",
    ]
    for i, f in enumerate(findings, 1):
        lines += [f"**{i}. {f.title}: {f.verdict}.**", ""]
        if f.criteria:
            lines += ["| criterion | measured | |", "|---|---|---|"]
            lines += [
                f"| {c.text} | {c.measured} | {'yes' if c.holds else 'no'} |" for c in f.criteria
            ]
            lines.append("")
    return lines
