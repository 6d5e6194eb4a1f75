"""Rule-based rewards (and a hook for learned ones), as plain callables.

Contract: `fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`.
`columns` are dataset fields, one entry per completion (`answer=[...]`, `task=[...]`,
`meta=[...]`, `question=[...]`, `language=[...]`, `completion_lengths=[...]`).

`None` means "could not be judged" (the checker failed, not the model); upstream leaves
such samples out of the advantage. Every `None` has a reason, kept in two places:
- the returned list is a `RewardResult` (a `list` subclass) whose `.reasons` holds one
  reason per score, `None` when there is nothing to say;
- the function's `last_reasons` holds the same list after each call.
Judged cases worth a word carry a reason too ("no answer", "multiple answers").

Built-ins (also by name through `get_reward(name, **options)`):
- `accuracy_reward` ("accuracy"): final answer vs the `answer` column;
- `format_reward` ("format"): R1-Zero `<think>...</think> <answer>...</answer>`;
  `chat_format_reward` ("chat_format"): R1 `<think>...</think> summary`;
- `language_consistency_reward` ("language_consistency");
- `overlong_penalty_reward(max_completion_tokens, buffer_tokens, ...)` ("overlong_penalty");
- `reward_model_reward(scorer, on="summary" | "response")` ("reward_model").
`combine_rewards` runs several with weights (a None in a weighted one makes the total None).
"""

from r1lab.rewards.accuracy import AccuracyReward, accuracy_reward
from r1lab.rewards.base import (
    FunctionReward,
    RewardFunction,
    RewardResult,
    get_reward,
    register_reward,
    reward_names,
)
from r1lab.rewards.combine import CombinedRewards, combine_rewards
from r1lab.rewards.format import FormatReward, chat_format_reward, check_format, format_reward
from r1lab.rewards.language import (
    LanguageConsistencyReward,
    count_words,
    detect_language,
    language_consistency_reward,
)
from r1lab.rewards.length import OverlongPenaltyReward, overlong_penalty_reward
from r1lab.rewards.reward_model import RewardModelReward, reward_model_reward

__all__ = [
    "AccuracyReward",
    "CombinedRewards",
    "FormatReward",
    "FunctionReward",
    "LanguageConsistencyReward",
    "OverlongPenaltyReward",
    "RewardFunction",
    "RewardModelReward",
    "RewardResult",
    "accuracy_reward",
    "chat_format_reward",
    "check_format",
    "combine_rewards",
    "count_words",
    "detect_language",
    "format_reward",
    "get_reward",
    "language_consistency_reward",
    "overlong_penalty_reward",
    "register_reward",
    "reward_model_reward",
    "reward_names",
]
