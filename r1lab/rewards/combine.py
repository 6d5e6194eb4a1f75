"""Several rewards into one: per-function scores, a weighted total, and what was not judged.

A `None` from any function with a non-zero weight makes the total `None`: a sample
whose accuracy could not be judged has no trustworthy total, and the RL step leaves it
out of the advantage instead of guessing. Functions with weight 0 are computed for the
logs only and never block the total.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r1lab.rewards.base import NO_REASON, RewardError, finite_or_none


@dataclass
class CombinedRewards:
    """The outcome of `combine_rewards` for one batch.

    `scores[name]` and `reasons[name]` are per sample; `total` the weighted sum (None
    when not judged); `none_reasons[name]` counts the reasons of that function's Nones.
    """

    weights: dict[str, float]
    scores: dict[str, list[float | None]]
    reasons: dict[str, list[str | None]]
    total: list[float | None]
    none_reasons: dict[str, Counter] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Batch means over judged samples, as `rewards/<name>/mean`, plus None shares."""
        out: dict[str, float] = {}
        n = len(self.total)
        for name, values in self.scores.items():
            judged = [v for v in values if v is not None]
            out[f"rewards/{name}/mean"] = sum(judged) / len(judged) if judged else math.nan
            out[f"rewards/{name}/none_frac"] = (n - len(judged)) / n if n else 0.0
        judged = [v for v in self.total if v is not None]
        out["reward"] = sum(judged) / len(judged) if judged else math.nan
        out["reward/none_frac"] = (n - len(judged)) / n if n else 0.0
        return out


def _name(fn: Callable, taken: dict) -> str:
    base = getattr(fn, "__name__", None) or type(fn).__name__
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def combine_rewards(
    fns_with_weights: Sequence[Callable | tuple[Callable, float]],
    prompts: list,
    completions: list[str],
    **columns: Any,
) -> CombinedRewards:
    """Run each reward function (bare, weight 1, or `(fn, weight)`) and add them up.

    Plain functions returning lists work too; their reasons come from a `.reasons`
    attribute of the result, when present. A NaN from a plain function counts as None
    ("not a finite score").
    """
    weights: dict[str, float] = {}
    scores: dict[str, list[float | None]] = {}
    reasons: dict[str, list[str | None]] = {}
    for item in fns_with_weights:
        fn, weight = item if isinstance(item, tuple) else (item, 1.0)
        name = _name(fn, weights)
        try:
            result = fn(prompts, completions, **columns)
        except Exception as err:  # a user's (or built-in) reward failed: name it, in one line
            what = str(err).strip().splitlines()
            raise RewardError(
                f"reward {name} raised {type(err).__name__}"
                + (f": {what[0]}" if what else "")
                + " (rerun with --debug for the traceback)"
            ) from err
        if len(result) != len(completions):
            raise ValueError(f"reward {name} returned {len(result)} scores for {len(completions)}")
        given = getattr(result, "reasons", None)
        given = (
            list(given) if given is not None and len(given) == len(result) else [None] * len(result)
        )
        values, why = [], []
        for value, reason in zip(result, given):
            score, problem = finite_or_none(value) if value is not None else (None, None)
            values.append(score)
            why.append(reason or problem or (None if score is not None else NO_REASON))
        weights[name], scores[name], reasons[name] = float(weight), values, why

    total: list[float | None] = []
    for i in range(len(completions)):
        s = 0.0
        for name, w in weights.items():
            if w == 0:
                continue
            v = scores[name][i]
            if v is None:
                s = None
                break
            s += w * v
        total.append(s)
    none_reasons = {
        name: Counter(r for v, r in zip(scores[name], reasons[name]) if v is None)
        for name in weights
    }
    return CombinedRewards(weights, scores, reasons, total, none_reasons)
