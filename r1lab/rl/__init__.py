"""RL math as pure functions over tensors: advantages, the policy loss, sample selection.

A variant is a combination of options:

- GRPO: `group_advantages(r, G)`, `policy_loss(..., beta=0.04)` with a reference model.
- Dr. GRPO: `group_advantages(r, G, scale="none")`,
  `policy_loss(..., aggregation="seq-mean-token-sum-norm", norm_length=max_new_tokens)`.
- DAPO: `policy_loss(..., eps_low=0.2, eps_high=0.28, aggregation="token-mean")`, plus
  `dynamic_sampling_filter`, `overlong_penalty` and optionally `truncation_mask`.
- GSPO: `policy_loss(..., ratio_level="sequence", eps_low=3e-4, eps_high=4e-4)`.
- RLOO: `group_advantages(r, G, baseline="loo", scale="none")`.
"""

from r1lab.rl.advantages import BASELINES, SCALES, group_advantages
from r1lab.rl.losses import AGGREGATIONS, RATIO_LEVELS, k3_kl, loss_normalizer, policy_loss
from r1lab.rl.sampling import (
    dynamic_sampling_filter,
    expand_group_indices,
    overlong_penalty,
    truncation_mask,
    zero_variance_groups,
)

__all__ = [
    "AGGREGATIONS",
    "BASELINES",
    "RATIO_LEVELS",
    "SCALES",
    "dynamic_sampling_filter",
    "expand_group_indices",
    "group_advantages",
    "k3_kl",
    "loss_normalizer",
    "overlong_penalty",
    "policy_loss",
    "truncation_mask",
    "zero_variance_groups",
]
