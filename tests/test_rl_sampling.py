"""Group filters, truncation masks and the overlong penalty on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from r1lab.rl import (
    dynamic_sampling_filter,
    expand_group_indices,
    overlong_penalty,
    truncation_mask,
    zero_variance_groups,
)

NAN = float("nan")
# groups of 2: all wrong, mixed, all right, one judged, mixed with floats
REWARDS = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, NAN, 1.0, 0.3, 0.2])


def test_zero_variance_groups():
    expected = torch.tensor([True, False, True, True, False])
    assert torch.equal(zero_variance_groups(REWARDS, 2), expected)
    assert torch.equal(zero_variance_groups([1.0, None, None, None], 2), torch.tensor([True, True]))


def test_dynamic_sampling_keeps_groups_with_spread():
    kept = dynamic_sampling_filter(REWARDS, 2)
    assert kept.tolist() == [1, 4]
    assert expand_group_indices(kept, 2).tolist() == [2, 3, 8, 9]
    assert dynamic_sampling_filter(torch.ones(4), 2).tolist() == []
    assert expand_group_indices(torch.tensor([], dtype=torch.long), 3).tolist() == []


def test_groups_must_be_whole():
    with pytest.raises(ValueError, match="divisible"):
        dynamic_sampling_filter(REWARDS, 3)


def test_truncation_mask_from_finish_reasons_and_bools():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    expected = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    out = truncation_mask(["stop", "length", "stop"], mask)
    assert torch.equal(out, expected) and out.dtype == mask.dtype
    assert torch.equal(mask[1], torch.ones(3))  # the input is left alone
    out = truncation_mask(torch.tensor([False, True, False]), mask.bool())
    assert torch.equal(out, expected.bool())


def test_truncation_mask_rejects_bad_input():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="finish reasons.*'lenght'"):
        truncation_mask(["stop", "lenght"], mask)
    with pytest.raises(ValueError, match="shape"):
        truncation_mask(torch.tensor([True]), mask)


def test_overlong_penalty_ramp():
    # max_len 10, buffer 4: free up to 6, then -1/4 per token, -1 at 10 and beyond
    lengths = [0, 6, 7, 8, 10, 11, 100]
    assert overlong_penalty(lengths, 10, 4).tolist() == [0, 0, -0.25, -0.5, -1, -1, -1]
    assert overlong_penalty(torch.tensor(lengths), 10, 4, penalty=0.5).tolist() == [
        0,
        0,
        -0.125,
        -0.25,
        -0.5,
        -0.5,
        -0.5,
    ]
    assert overlong_penalty(lengths, 10, 0).tolist() == [0, 0, 0, 0, 0, -1, -1]
    assert overlong_penalty([5], 10, 10).tolist() == [-0.5]
    assert not torch.signbit(overlong_penalty([0], 10, 4)).any()  # +0.0, not -0.0


def test_overlong_penalty_rejects_bad_settings():
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([1], 10, 11)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty([1], 0, 0)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty([1], 10, 2, penalty=-1.0)
