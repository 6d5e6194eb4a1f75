"""When a supervised run stops, and where its learning-rate schedule stands."""

from __future__ import annotations

import time
from dataclasses import dataclass

from r1lab.training import lr_at


@dataclass
class Budget:
    """When training stops, and how far along its schedule it is.

    Steps and wall-clock time are both budgets; whichever runs out first ends the run. The
    learning-rate schedule follows the same progress, so a run cut short by the clock on a
    slow machine still finishes its cosine decay instead of stopping at a high rate. The
    price: with a clock budget the schedule, and so every number after the first step,
    depends on the machine's speed (setup time included). A run that must reproduce
    exactly across invocations sets `max_minutes` to null (the tiny preset does).
    """

    max_steps: int
    max_seconds: float | None = None

    def progress(self, step: int, elapsed: float) -> float:
        done = step / self.max_steps
        if self.max_seconds is not None:
            done = max(done, elapsed / max(self.max_seconds, 1e-9))
        return min(done, 1.0)

    def stop_reason(self, step: int, elapsed: float) -> str | None:
        if step >= self.max_steps:
            return "max_steps"
        if self.max_seconds is not None and elapsed >= self.max_seconds:
            return "max_minutes"
        return None


class Clock:
    """Training time that survives a resume (time spent before the restart is added)."""

    def __init__(self, before: float = 0.0):
        self.before, self.start = before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start


def scheduled_lr(cfg, budget: Budget, total_steps: int, step: int, elapsed: float) -> float:
    """Warmup, then cosine to `cfg.min_lr_ratio` over the budget's progress (steps or time)."""
    position = max(step, budget.progress(step, elapsed) * total_steps)
    return lr_at(position, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
