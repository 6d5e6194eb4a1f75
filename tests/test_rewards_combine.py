"""Overlong penalty, the reward-model hook, the registry and combining rewards."""

from __future__ import annotations

import math

import pytest

from r1lab.rewards import (
    FunctionReward,
    RewardResult,
    combine_rewards,
    get_reward,
    reward_names,
)
from r1lab.rewards.base import NO_REASON

accuracy_reward = get_reward("accuracy")
format_reward = get_reward("format")


def overlong_penalty_reward(max_completion_tokens, buffer_tokens, **options):
    return get_reward(
        "overlong_penalty",
        max_completion_tokens=max_completion_tokens,
        buffer_tokens=buffer_tokens,
        **options,
    )


def reward_model_reward(scorer, **options):
    return get_reward("reward_model", scorer=scorer, **options)


# --- overlong penalty -------------------------------------------------------------------


def test_overlong_penalty_ramp_from_token_lengths():
    reward = overlong_penalty_reward(max_completion_tokens=100, buffer_tokens=20, penalty=1.0)
    lengths = [10, 80, 90, 95, 100, 150]
    result = reward(["Q"] * 6, ["x"] * 6, completion_lengths=lengths)
    assert list(result) == pytest.approx([0.0, 0.0, -0.5, -0.75, -1.0, -1.0])
    ids = [[1] * n for n in lengths]
    assert list(reward(["Q"] * 6, ["x"] * 6, completion_ids=ids)) == list(result)


def test_overlong_penalty_lengths_from_tokenizer_or_characters():
    class Tok:  # one token per word
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    reward = overlong_penalty_reward(10, 4, penalty=0.5, tokenizer=Tok())
    assert list(reward(["Q"], ["w " * 8])) == pytest.approx([-0.25])  # 8 tokens: 2/4 of the ramp
    heuristic = overlong_penalty_reward(10, 4)
    assert list(heuristic(["Q"], ["abcd" * 8])) == pytest.approx([-0.5])  # 32 chars ~ 8 tokens


def test_overlong_penalty_rejects_bad_settings():
    with pytest.raises(ValueError):
        overlong_penalty_reward(100, 200)
    with pytest.raises(TypeError, match="overlong_penalty"):
        get_reward("overlong_penalty")


# --- reward model hook ------------------------------------------------------------------


def test_reward_model_judges_summary_or_response():
    seen = []

    def scorer(prompts, texts):
        seen.append(list(texts))
        return [float(len(t)) for t in texts]

    completions = ["<think>long reasoning</think> short", "<think> never closed", "no reasoning"]
    summary = reward_model_reward(scorer, on="summary")
    result = summary(["Q"] * 3, completions)
    assert seen[-1] == ["short", "no reasoning"]
    assert result[0] == 5.0 and result[1] is None and result[2] == 12.0
    assert "no summary" in result.reasons[1]

    response = reward_model_reward(scorer, on="response")
    assert list(response(["Q"] * 3, completions)) == [float(len(c)) for c in completions]


def test_reward_model_failures_are_none_with_reason():
    def down(prompts, texts):
        raise ConnectionError("judge offline")

    result = reward_model_reward(down)(["Q"], ["<think>a</think> b"])
    assert result[0] is None and "judge offline" in result.reasons[0]

    result = reward_model_reward(lambda p, t: [math.nan])(["Q"], ["<think>a</think> b"])
    assert result[0] is None and "finite" in result.reasons[0]

    with pytest.raises(ValueError, match="scores"):
        reward_model_reward(lambda p, t: [1.0, 2.0])(["Q"], ["<think>a</think> b"])
    with pytest.raises(ValueError):
        reward_model_reward(lambda p, t: [], on="thoughts")


# --- registry ---------------------------------------------------------------------------


def test_registry_names_and_fresh_instances():
    assert set(reward_names()) >= {
        "accuracy",
        "format",
        "chat_format",
        "language_consistency",
        "overlong_penalty",
        "reward_model",
    }
    a, b = get_reward("accuracy"), get_reward("accuracy_reward")
    assert a is not b and a.__name__ == b.__name__ == "accuracy"
    assert get_reward("chat_format").structure == "r1-chat"
    with pytest.raises(KeyError, match="known rewards"):
        get_reward("helpfulness")


# --- combining ---------------------------------------------------------------------------


def test_combine_weighted_total_and_none_propagation(monkeypatch):
    completions = [
        " <think> a </think> <answer> 4 </answer>",  # right, well formed
        " <think> a </think> <answer> 5 </answer>",  # wrong, well formed
        "4",  # no answer, no format
    ]

    def flaky(prompts, completions, **columns):
        return RewardResult([1.0, None, 0.0], [None, "judge timeout", None])

    flaky.__name__ = "flaky"

    def logged_only(prompts, completions, **columns):
        return [None, None, None]

    result = combine_rewards(
        [(accuracy_reward, 1.0), (format_reward, 0.5), (flaky, 2.0), (logged_only, 0.0)],
        ["Q"] * 3,
        completions,
        answer=["4", "4", "4"],
    )
    assert result.scores["accuracy"] == [1.0, 0.0, 0.0]
    assert result.scores["format"] == [1.0, 1.0, 0.0]
    assert result.total == [1.0 + 0.5 + 2.0, None, 0.0]  # flaky's None blocks the total
    assert result.none_reasons["flaky"] == {"judge timeout": 1}
    assert result.none_reasons["logged_only"] == {NO_REASON: 3}  # weight 0: never blocks
    assert result.reasons["accuracy"][2] == "no answer"
    metrics = result.metrics()
    assert metrics["rewards/accuracy/mean"] == pytest.approx(1 / 3)
    assert metrics["rewards/flaky/none_frac"] == pytest.approx(1 / 3)
    assert metrics["reward"] == pytest.approx((3.5 + 0.0) / 2)


def test_combine_bare_functions_duplicates_and_nan():
    def nan_reward(prompts, completions, **columns):
        return [math.nan, 1.0]

    result = combine_rewards([format_reward, format_reward, nan_reward], ["Q", "Q"], ["x", "y"])
    assert list(result.scores) == ["format", "format_2", "nan_reward"]
    assert result.scores["nan_reward"] == [None, 1.0]
    assert "finite" in result.reasons["nan_reward"][0]
    assert result.total == [None, 1.0]


def test_function_reward_wraps_a_plain_function():
    wrapped = FunctionReward(lambda prompts, completions, **_: [1.0, None], name="plain")
    result = wrapped(["Q", "Q"], ["a", "b"])
    assert list(result) == [1.0, None] and result.reasons == [None, NO_REASON]
    assert wrapped.__name__ == "plain"
    with pytest.raises(ValueError, match="column 'answer'"):
        wrapped(["Q", "Q"], ["a", "b"], answer=["1"])
