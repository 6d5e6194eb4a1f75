"""What a GRPO run carries from step to step and across a restart.

`RunState` is the loop's state; `TrainingSnapshot` bundles the weights and optimizer that
`save_checkpoint` writes as one consistent checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1lab.engine.grpo_update import UpdateSettings
from r1lab.model.checkpoint import save_model, save_training_state
from r1lab.stages.judging import RewardSet
from r1lab.stages.rollout import TaskMixture


class TrainingSnapshot:
    """Policy weights, optimizer and (once refreshed) reference weights as one object.

    Saved through the optimizer slot of `save_training_state`, so that `state/` alone is
    a consistent checkpoint: a kill between writing `state/` and `model/` cannot pair
    weights of one step with the optimizer of another.
    """

    def __init__(self, policy, optimizer, ref_model=None, ref_synced: bool = False):
        self.policy, self.optimizer, self.ref_model, self.ref_synced = (
            policy,
            optimizer,
            ref_model,
            ref_synced,
        )

    def state_dict(self) -> dict:
        ref = (
            self.ref_model.state_dict() if self.ref_model is not None and self.ref_synced else None
        )
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ref": ref,
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("ref") is not None and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref"])


def save_checkpoint(
    out: Path,
    snapshot: TrainingSnapshot,
    tokenizer,
    step: int,
    extra: dict,
    dtype: torch.dtype = torch.float32,
) -> None:
    """state/ (everything to resume, fp32) first, then model/ (the HF folder, in `dtype`)."""
    save_training_state(
        out / "state", optimizer=snapshot, step=step, data_position=step, extra=extra
    )
    save_model(snapshot.policy, out / "model", tokenizer=tokenizer, dtype=dtype)


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
