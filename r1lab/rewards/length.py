"""DAPO's soft overlong punishment as a reward term.

The formula lives in `r1lab.rl.sampling.overlong_penalty` (one copy of the math): 0 up
to `max_completion_tokens - buffer_tokens`, then a linear ramp down to `-penalty` at
`max_completion_tokens`, and `-penalty` beyond.

Lengths, first available: a `completion_lengths` column (token counts from the sampler),
a `completion_ids` column (their lengths), the `tokenizer` given to the factory, or, as a
last resort, characters / 4 rounded up (about the tokens of English text for BPE
tokenizers; a heuristic, so pass real lengths when training).
"""

from __future__ import annotations

import math
from typing import Any

from r1lab.rewards.base import RewardFunction, RewardResult, register_reward

CHARS_PER_TOKEN = 4


def _penalty(lengths: list[int], max_len: int, buffer_len: int, penalty: float) -> list[float]:
    from r1lab.rl.sampling import overlong_penalty

    return overlong_penalty(lengths, max_len, buffer_len, penalty).tolist()


class OverlongPenaltyReward(RewardFunction):
    """A reward <= 0 that grows more negative as a completion nears the length budget."""

    def __init__(
        self,
        max_completion_tokens: int,
        buffer_tokens: int,
        penalty: float = 1.0,
        tokenizer: Any = None,
        name: str = "overlong_penalty",
    ):
        super().__init__(name)
        _penalty([0], max_completion_tokens, buffer_tokens, penalty)  # validate the settings now
        self.max_len, self.buffer_len, self.penalty = max_completion_tokens, buffer_tokens, penalty
        self.tokenizer = tokenizer

    def lengths(
        self,
        completions: list[str],
        completion_lengths: Any = None,
        completion_ids: Any = None,
    ) -> list[int]:
        """Completion lengths in tokens (see the module docstring for the order tried)."""
        if completion_lengths is not None:
            return [int(n) for n in completion_lengths]
        if completion_ids is not None:
            return [len(ids) for ids in completion_ids]
        if self.tokenizer is not None:
            ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
            return [len(x) for x in ids]
        return [math.ceil(len(c) / CHARS_PER_TOKEN) for c in completions]

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_lengths: Any = None,
        completion_ids: Any = None,
        **_: Any,
    ) -> RewardResult:
        lengths = self.lengths(completions, completion_lengths, completion_ids)
        return RewardResult(_penalty(lengths, self.max_len, self.buffer_len, self.penalty))


@register_reward("overlong_penalty")
def make_overlong_penalty_reward(
    max_completion_tokens: int, buffer_tokens: int, penalty: float = 1.0, tokenizer: Any = None
) -> OverlongPenaltyReward:
    """The soft overlong penalty for a budget of `max_completion_tokens` tokens, ramping
    over the last `buffer_tokens` of it."""
    return OverlongPenaltyReward(max_completion_tokens, buffer_tokens, penalty, tokenizer)
