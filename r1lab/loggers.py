"""Optional mirrors of metrics.jsonl: TensorBoard and Weights & Biases.

metrics.jsonl stays the record (reports, resume and plots read it); a logger receives the
same records with the same metric names, numbers only, at the record's `step`. Both are
off by default and need their own package: `pip install 'r1lab[tensorboard]'` or
`'r1lab[wandb]'`. Turn them on per stage with `loggers=[tensorboard,wandb]`, or for every
stage of a run (`r1lab run` included) with `R1LAB_LOGGERS=tensorboard,wandb`.

- tensorboard: event files in `RUN_DIR/tensorboard/` (`tensorboard --logdir RUN_DIR`).
- wandb: a run named after the run dir, in project `$WANDB_PROJECT` (default "r1lab"),
  with the stage's config.yaml as its config; offline unless `WANDB_MODE` says otherwise
  (its files land in `RUN_DIR/wandb/`; `wandb sync` uploads them later).
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any

LOGGER_NAMES = ("tensorboard", "wandb")


class LoggerError(ValueError):
    """An unknown logger or a logger whose package is missing."""


def numbers(record: dict) -> dict[str, float]:
    """The finite numeric entries of a record (what a logger can plot), `step` left out."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _import_for(logger: str, module: str):
    """`module`, which `logger` needs; missing, a LoggerError that says how to install it
    (each logger's package and r1lab extra are named after the logger)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise LoggerError(
            f"logger '{logger}' needs the {logger} package: pip install 'r1lab[{logger}]' "
            "(or drop it from loggers)"
        ) from err


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: dict | None = None):
        tensorboard = _import_for("tensorboard", "torch.utils.tensorboard")
        self.writer = tensorboard.SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict | None = None):
        wandb = _import_for("wandb", "wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "r1lab"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config or {},
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit=True,
        )

    def log(self, record: dict) -> None:
        self.run.log(numbers(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def check_names(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise LoggerError(f"unknown loggers {unknown}; known: {', '.join(LOGGER_NAMES)}")
    return names


def env_loggers() -> list[str]:
    raw = os.environ.get("R1LAB_LOGGERS", "")
    return check_names([n.strip() for n in raw.split(",") if n.strip()])


def make_loggers(names: list[str], run_dir: Path, config: dict | None = None) -> list[Any]:
    return [KINDS[name](Path(run_dir), config) for name in dict.fromkeys(check_names(names))]
