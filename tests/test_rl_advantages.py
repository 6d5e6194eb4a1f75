"""group_advantages on groups whose advantages are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from r1lab.rl import BASELINES, SCALES, group_advantages

NAN = float("nan")
# Three groups of 3: spread, all equal, skewed.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 0.0, 3.0])
R3 = math.sqrt(3.0)


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> bool:
    return torch.allclose(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol)


def test_grpo_group_std():
    # group 1: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1        -> -1, 0, 1
    # group 2: all equal                                             -> 0, 0, 0
    # group 3: mean 1, sample std sqrt((1 + 1 + 4) / 2) = sqrt(3)   -> -1/√3, -1/√3, 2/√3
    adv = group_advantages(REWARDS, 3)
    assert close(adv, [-1, 0, 1, 0, 0, 0, -1 / R3, -1 / R3, 2 / R3])


def test_binary_group_uses_sample_std():
    # mean 0.5, deviations ±0.5, sample std sqrt(4 * 0.25 / 3) = 1/√3 -> ±0.5·√3 = ±0.8660
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert close(adv, [0.8660254, -0.8660254, -0.8660254, 0.8660254])


def test_dr_grpo_no_scaling():
    adv = group_advantages(REWARDS, 3, scale="none")
    assert close(adv, [-1, 0, 1, 0, 0, 0, -1, -1, 2], atol=1e-7)


def test_rloo_baseline():
    # group 1: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # group 3: 0 - (0+3)/2 = -1.5 (twice), 3 - 0 = 3
    adv = group_advantages(REWARDS, 3, baseline="loo", scale="none")
    assert close(adv, [-1.5, 0, 1.5, 0, 0, 0, -1.5, -1.5, 3], atol=1e-7)
    # loo = G/(G-1) * (r - mean): with the group std, group 1 gives 1.5 * (-1, 0, 1)
    adv = group_advantages(REWARDS, 3, baseline="loo")
    assert close(adv[:3], [-1.5, 0, 1.5])


def test_batch_std():
    # batch mean 8/3; squared deviations (in ninths) 25+4+1+49+49+49+64+64+1 = 306 -> 34;
    # sample variance 34/8 = 4.25, std 2.0615528
    s = 2.0615528
    adv = group_advantages(REWARDS, 3, scale="batch")
    assert close(adv, [-1 / s, 0, 1 / s, 0, 0, 0, -1 / s, -1 / s, 2 / s])


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_equal_rewards_give_exactly_zero(scale, baseline, eps):
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not depend on rounding
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    adv = group_advantages(rewards, 3, scale=scale, baseline=baseline, eps=eps)
    assert torch.equal(adv, torch.zeros(6))
    mixed = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 1.0])
    adv = group_advantages(mixed, 3, scale=scale, baseline=baseline, eps=eps)
    assert torch.equal(adv[:3], torch.zeros(3)) and not torch.isnan(adv).any()


def test_nan_rewards_are_left_out():
    rewards = torch.tensor([1.0, NAN, 3.0, NAN, 2.0, NAN, NAN, NAN, NAN])
    # group 1 judged (1, 3): mean 2, sample std √2 -> -1/√2, 0, 1/√2
    # group 2 has one judged reward and group 3 none: no signal
    adv = group_advantages(rewards, 3)
    assert close(adv, [-1 / math.sqrt(2), 0, 1 / math.sqrt(2), 0, 0, 0, 0, 0, 0])
    adv = group_advantages(rewards, 3, baseline="loo", scale="none")
    assert close(adv, [-2, 0, 2, 0, 0, 0, 0, 0, 0])
    # batch std over judged rewards only: (1, 3, 2) has sample std 1
    adv = group_advantages(rewards, 3, scale="batch")
    assert close(adv, [-1, 0, 1, 0, 0, 0, 0, 0, 0])


def test_none_in_a_list_means_not_judged():
    adv = group_advantages([1.0, None, 3.0, 1, 1, 0], 3, scale="none")
    assert close(adv, [-1, 0, 1, 1 / 3, 1 / 3, -2 / 3])


def test_integer_rewards_and_float64_kept():
    assert group_advantages(torch.tensor([0, 1]), 2).dtype == torch.float32
    assert group_advantages(REWARDS.double(), 3).dtype == torch.float64


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(REWARDS, 0)
    with pytest.raises(ValueError, match="scale.*'group'.*'batch'.*'none'"):
        group_advantages(REWARDS, 3, scale="std")
    with pytest.raises(ValueError, match="baseline.*'mean'.*'loo'"):
        group_advantages(REWARDS, 3, baseline="median")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(REWARDS.reshape(3, 3), 3)
