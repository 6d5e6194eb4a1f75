"""Which samples to train on: group filters, truncation masks, the overlong penalty.

Pure functions over tensors. Groups are consecutive runs of `group_size` samples (the
layout the sampler produces with `n > 1`). A NaN reward means "could not be judged"
(`None` upstream) and is ignored wherever group statistics are taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FINISH_REASONS = ("stop", "length")


def as_reward_tensor(rewards: torch.Tensor | Sequence[float | None]) -> torch.Tensor:
    """Rewards as a 1-D float tensor, `None` becoming NaN (the "not judged" marker)."""
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.tensor(
            [float("nan") if r is None else float(r) for r in rewards], dtype=torch.float32
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    return rewards


def grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """View (N,) rewards as (N / group_size, group_size), checking that groups are whole."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not divisible by "
            f"group_size ({group_size}); groups must be whole and consecutive"
        )
    return rewards.reshape(-1, group_size)


def zero_variance_groups(
    rewards: torch.Tensor | Sequence[float | None], group_size: int
) -> torch.Tensor:
    """Bool (num_groups,): True where a group carries no learning signal.

    That is a group whose judged rewards are all equal, including groups with fewer than
    two judged rewards (NaN entries are ignored). GRPO gives every sample of such a group
    advantage 0, so its loss is zero: the share of these groups (`frac_reward_zero_std`)
    is the first thing to watch when a run stops learning.
    """
    r = grouped(as_reward_tensor(rewards), group_size)
    valid = ~torch.isnan(r)
    hi = torch.where(valid, r, -torch.inf).amax(dim=1)
    lo = torch.where(valid, r, torch.inf).amin(dim=1)
    return ~(hi > lo)


def dynamic_sampling_filter(
    rewards: torch.Tensor | Sequence[float | None], group_size: int
) -> torch.Tensor:
    """Indices (int64, ascending) of the groups to keep under DAPO's dynamic sampling.

    DAPO drops groups whose rewards are all equal (all right or all wrong) and samples more
    prompts until the batch is full, so that every group in the batch has a gradient. Use
    `expand_group_indices` to turn the result into sample indices.
    """
    return torch.nonzero(~zero_variance_groups(rewards, group_size)).flatten()


def expand_group_indices(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sample indices (int64) of the given groups, in group order: [g*G, ..., g*G + G-1]."""
    groups = torch.as_tensor(groups, dtype=torch.long).flatten()
    offsets = torch.arange(group_size, dtype=torch.long, device=groups.device)
    return (groups[:, None] * group_size + offsets).flatten()


def truncation_mask(truncated: torch.Tensor | Sequence[str], mask: torch.Tensor) -> torch.Tensor:
    """`mask` with the rows of truncated completions zeroed (a new tensor, same dtype).

    A completion cut off by the length budget has no final answer, so its reward says
    little about its tokens; masking it out of the loss (DAPO's "overlong filtering")
    avoids punishing reasoning that was merely long. `truncated` is either the sampler's
    finish reasons ("stop" | "length", "length" meaning truncated) or a bool tensor (N,).
    """
    if not isinstance(truncated, torch.Tensor):
        reasons = list(truncated)
        unknown = sorted({r for r in reasons if r not in FINISH_REASONS}, key=str)
        if unknown:
            raise ValueError(
                f"finish reasons must be one of {FINISH_REASONS}, got {', '.join(map(repr, unknown))}"
            )
        truncated = torch.tensor([r == "length" for r in reasons], dtype=torch.bool)
    truncated = truncated.to(device=mask.device, dtype=torch.bool)
    if mask.dim() != 2 or truncated.shape != (mask.shape[0],):
        raise ValueError(
            f"truncated must have shape (N,) and mask (N, T); got {tuple(truncated.shape)} "
            f"and {tuple(mask.shape)}"
        )
    return torch.where(truncated[:, None], torch.zeros_like(mask), mask)


def overlong_penalty(
    lengths: torch.Tensor | Sequence[int],
    max_len: int,
    buffer_len: int,
    penalty: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term <= 0 per completion (float32 (N,)).

    0 while length <= max_len - buffer_len, then falling linearly to -penalty at max_len,
    and -penalty beyond. The ramp tells the policy that it is running out of budget before
    the hard cut-off, instead of a sudden cliff. `lengths` are completion token counts;
    `buffer_len=0` gives a hard step at max_len. Add the result to the task reward.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in [0, max_len={max_len}], got {buffer_len}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0 (it is subtracted), got {penalty}")
    lengths = torch.as_tensor(lengths).to(torch.float32)
    over = lengths - (max_len - buffer_len)
    if buffer_len == 0:
        frac = (over > 0).to(torch.float32)
    else:
        frac = (over / buffer_len).clamp(min=0.0, max=1.0)
    return penalty * (0.0 - frac)  # written so that no penalty is +0.0, not -0.0
