"""A hook for learned rewards: wrap any `scorer(prompts, texts) -> list[float]`.

R1's last RL stage judges helpfulness on the final summary only (so the reasoning is not
pushed towards pleasing a judge) and harmlessness on the whole response. `on` picks
which text the scorer sees: "summary" (the text outside the reasoning) or "response".

A completion whose reasoning never closed has no summary: it scores `no_summary_score`
(None by default: not judged, reason recorded). A scorer that raises, or returns a
non-finite number, gives None with the reason: a judge failure is not a bad answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from r1lab.rewards.base import (
    RewardFunction,
    RewardResult,
    finite_or_none,
    prefills_think,
    register_reward,
)
from r1lab.tasks.answers import split_think

Scorer = Callable[[list[str], list[str]], Sequence[float]]


def text_to_judge(prompt: str, completion: str, on: str = "summary") -> str | None:
    """The text a reward model sees, in training (r1lab.stages.reward_model) and in scoring.

    `on="response"`: the whole completion. `on="summary"`: the text outside the reasoning,
    or None when there is none to judge (the reasoning never closed, or nothing follows it).
    """
    if on == "response":
        return completion
    parts = split_think(completion, prefilled=prefills_think(prompt))
    summary = parts.outside.strip()
    return summary if parts.closed and summary else None


class RewardModelReward(RewardFunction):
    """Scores from `scorer` on the summary or the whole response."""

    def __init__(
        self,
        scorer: Scorer,
        on: str = "summary",
        no_summary_score: float | None = None,
        name: str = "reward_model",
    ):
        if on not in ("summary", "response"):
            raise ValueError(f"on must be 'summary' or 'response', got {on!r}")
        if not callable(scorer):
            raise TypeError(f"scorer must be callable, got {type(scorer).__name__}")
        super().__init__(name)
        self.scorer, self.on, self.no_summary_score = scorer, on, no_summary_score

    def score(self, prompts: list[str], completions: list[str], **_: Any) -> RewardResult:
        texts = [text_to_judge(p, c, self.on) for p, c in zip(prompts, completions)]
        judged = [i for i, t in enumerate(texts) if t is not None]
        scores: list[float | None] = [self.no_summary_score] * len(completions)
        reasons: list[str | None] = ["no summary (reasoning not closed or empty)"] * len(
            completions
        )
        if not judged:
            return RewardResult(scores, reasons)
        try:
            raw = list(self.scorer([prompts[i] for i in judged], [texts[i] for i in judged]))
        except Exception as e:  # noqa: BLE001  (the judge failed, not the policy)
            reason = f"reward model failed: {type(e).__name__}: {e}"[:300]
            for i in judged:
                scores[i], reasons[i] = None, reason
            return RewardResult(scores, reasons)
        if len(raw) != len(judged):
            raise ValueError(
                f"reward model scorer returned {len(raw)} scores for {len(judged)} texts"
            )
        for i, value in zip(judged, raw):
            scores[i], reasons[i] = finite_or_none(value)
        return RewardResult(scores, reasons)


@register_reward("reward_model")
def make_reward_model_reward(
    scorer: Scorer, on: str = "summary", no_summary_score: float | None = None
) -> RewardModelReward:
    """A reward from a learned scorer, judging the summary (default) or the response."""
    return RewardModelReward(scorer, on=on, no_summary_score=no_summary_score)
