"""Group-relative advantages: GRPO, Dr. GRPO, RLOO and batch-std scaling as options."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1lab.rl.sampling import as_reward_tensor, grouped, zero_variance_groups

SCALES = ("group", "batch", "none")
BASELINES = ("mean", "loo")


def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def group_advantages(
    rewards: torch.Tensor | Sequence[float | None],
    group_size: int,
    scale: str = "group",
    baseline: str = "mean",
    eps: float = 1e-6,
) -> torch.Tensor:
    """One advantage per sample, relative to the other samples of its prompt's group.

    `rewards` (N,) holds consecutive groups of `group_size` samples of the same prompt.
    The advantage of sample i is (r_i - b_i) / (s + eps):

    - `baseline="mean"`: b_i is the group mean (GRPO); `"loo"`: the mean of the other
      judged rewards of the group (RLOO), which keeps b_i independent of r_i.
    - `scale="group"`: s is the group's std (GRPO); `"batch"`: the std of every judged
      reward in the batch, so that a group with a tiny spread is not blown up; `"none"`:
      s = 1 and no eps (Dr. GRPO, which argues the division biases towards easy and hard
      prompts).

    Stds are the sample std with Bessel's correction (divide by n - 1), as `torch.std`
    does by default and as the common GRPO implementations use.

    A group with no spread carries no signal: if all its judged rewards are equal (or
    fewer than two are judged) every sample gets exactly 0, never NaN, whatever the scale
    (also when the batch std is 0). A NaN reward means "could not be judged" (None
    upstream; a list with None is accepted): it is left out of its group's mean and std
    and of the batch std, and its sample gets advantage 0, so a judging failure neither
    rewards nor punishes anything.
    """
    _check_option("scale", scale, SCALES)
    _check_option("baseline", baseline, BASELINES)
    rewards = as_reward_tensor(rewards)
    r = grouped(rewards, group_size)
    valid = ~torch.isnan(r)
    x = torch.where(valid, r, torch.zeros_like(r))
    n = valid.sum(dim=1, keepdim=True).to(r.dtype)
    total = x.sum(dim=1, keepdim=True)
    mean = total / n.clamp(min=1)

    if baseline == "mean":
        centered = x - mean
    else:
        centered = x - (total - x) / (n - 1).clamp(min=1)

    if scale == "group":
        sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=1, keepdim=True)
        std = (sq / (n - 1).clamp(min=1)).sqrt()
        centered = centered / (std + eps)
    elif scale == "batch":
        judged = rewards[~torch.isnan(rewards)]
        std = judged.std() if judged.numel() > 1 else rewards.new_zeros(())
        centered = centered / (std + eps)

    keep = valid & ~zero_variance_groups(rewards, group_size)[:, None]
    return torch.where(keep, centered, torch.zeros_like(centered)).reshape(-1)
