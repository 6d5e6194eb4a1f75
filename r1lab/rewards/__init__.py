"""Rule-based rewards (and a hook for learned ones), as plain callables.

Contract: `fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`.
`columns` are dataset fields, one entry per completion (`answer=[...]`, `task=[...]`,
`meta=[...]`, `question=[...]`, `language=[...]`, `completion_lengths=[...]`).

`None` means "could not be judged" (the checker failed, not the model); upstream leaves
such samples out of the advantage. Every `None` has a reason: the returned list is a
`RewardResult` (a `list` subclass) whose `.reasons` holds one reason per score, `None` when
there is nothing to say. Judged cases worth a word carry a reason too ("no answer",
"multiple answers").

A reward is made by name, fresh on every call, with `get_reward(name, **options)`:
- "accuracy": final answer vs the `answer` column (`AccuracyReward`);
- "format": R1-Zero `<think>...</think> <answer>...</answer>`; "chat_format": R1
  `<think>...</think> summary` (`FormatReward`);
- "language_consistency" (`LanguageConsistencyReward`);
- "overlong_penalty" with `max_completion_tokens, buffer_tokens, ...` (`OverlongPenaltyReward`);
- "reward_model" with `scorer, on="summary" | "response"` (`RewardModelReward`);
- "code": the last fenced block run against the `tests` column in a sandbox (`CodeReward`).
A user's reward is named `module:function` or `path/to/file.py:function` (`r1lab.user_code`).
`combine_rewards` runs several with weights (a None in a weighted one makes the total None).
Each reward module registers its rewards by name (`r1lab.rewards.base.register_reward`);
this package imports all of them, so `get_reward` and `reward_names` see every built-in.
"""

from collections.abc import Callable
from typing import Any

from r1lab.rewards.accuracy import AccuracyReward
from r1lab.rewards.base import (
    REGISTERED,
    FunctionReward,
    RewardError,
    RewardFunction,
    RewardResult,
    register_reward,
)
from r1lab.rewards.code import CodeReward, code_reward, extract_code
from r1lab.rewards.combine import CombinedRewards, combine_rewards
from r1lab.rewards.format import FormatReward, check_format
from r1lab.rewards.language import LanguageConsistencyReward, count_words, detect_language
from r1lab.rewards.length import OverlongPenaltyReward
from r1lab.rewards.reward_model import RewardModelReward

__all__ = [
    "AccuracyReward",
    "CodeReward",
    "CombinedRewards",
    "FormatReward",
    "FunctionReward",
    "LanguageConsistencyReward",
    "OverlongPenaltyReward",
    "RewardError",
    "RewardFunction",
    "RewardModelReward",
    "RewardResult",
    "check_format",
    "code_reward",
    "combine_rewards",
    "count_words",
    "detect_language",
    "extract_code",
    "get_reward",
    "register_reward",
    "reward_names",
]


def get_reward(name: str, **options: Any) -> Callable:
    """A fresh reward function by name ("accuracy" or "accuracy_reward", ...), or a user's
    own: `module:function` or `path/to/file.py:function` (relative to the working
    directory; with options, the callable is a factory called with them)."""
    if ":" in name:
        from r1lab.user_code import load_callable

        fn = load_callable(name, "reward")
        return fn(**options) if options else fn
    key = name.removesuffix("_reward")
    if key not in REGISTERED:
        known = ", ".join(sorted(REGISTERED))
        raise KeyError(f"unknown reward {name!r}; known rewards: {known}")
    try:
        return REGISTERED[key](**options)
    except TypeError as e:
        raise TypeError(f"reward {key!r}: {e}") from e


def reward_names() -> list[str]:
    return sorted(REGISTERED)
