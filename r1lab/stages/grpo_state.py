"""What a GRPO run carries from step to step and across a restart.

`RunState` is the loop's state. Its `snapshot` (an `r1lab.snapshot.TrainingSnapshot` of the
policy, the optimizer and, once refreshed, the reference) and `extra()` are what
`r1lab.snapshot.save_checkpoint` writes as one consistent checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from r1lab.engine.grpo_update import UpdateSettings
from r1lab.model.tokenizer import PromptTemplate
from r1lab.snapshot import TrainingSnapshot
from r1lab.stages.judging import RewardSet
from r1lab.stages.rollout import TaskMixture


@dataclass
class RunState:
    """Everything the loop carries from step to step (and saves for a resume)."""

    policy: Any
    tokenizer: Any
    ref_model: Any
    optimizer: torch.optim.Optimizer
    snapshot: TrainingSnapshot
    mixture: TaskMixture
    rewards: RewardSet
    late_rewards: RewardSet | None
    eval_task: Any
    eval_examples: list
    update: UpdateSettings
    start: int = 0
    elapsed_before: float = 0.0
    nan_streak: int = 0
    ref_synced_at: int = 0
    initial_eval: dict | None = None
    last_eval: dict | None = None
    last_warned: int | None = None
    t_start: float = 0.0
    template: PromptTemplate | None = None  # the rollouts': system prompt, instruction applied

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def extra(self) -> dict:
        return {
            "elapsed_s": self.elapsed(),
            "nan_streak": self.nan_streak,
            "ref_synced_at": self.ref_synced_at,
            "initial_eval": self.initial_eval,
            "last_eval": self.last_eval,
        }
