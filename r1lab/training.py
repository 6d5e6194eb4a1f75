"""What every training stage shares: seeding, optimizer, schedule, run dirs, logs, progress.

Kept in one module so the stages differ only in what they compute, not in how they log,
schedule or save.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# One definition each, imported from here by the stages that predate their modules.
from r1lab.model.checkpoint import atomic_write_text, resolve_model_dir  # noqa: E402,F401
from r1lab.rows import read_jsonl  # noqa: E402,F401

console = Console(stderr=True)
DONE_FILE = "DONE"


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss, gradient or weights): the stage stops without DONE,
    keeping its last good checkpoint; the message says where it is and what to change."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def set_cpu_threads() -> None:
    """One intra-op thread on the CPU unless the user chose (OMP_NUM_THREADS).

    The tiny models' matrices are too small for threads to pay for their synchronisation,
    and when another job shares the cores, threads that wait on each other collapse: the
    tiny pretraining ran at 950 tokens/s with two threads beside another job, 9,300 with
    one (2-core CPU, 2026-11-28). Set OMP_NUM_THREADS for bigger models on many cores.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


# ---- optimisation -----------------------------------------------------------------------------
def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas=(0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW; norms, biases and embeddings-as-vectors (1-D tensors) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def lr_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_steps: int = 0,
    min_ratio: float = 0.1,
    schedule: str = "cosine",
) -> float:
    """Linear warmup, then cosine (or constant) decay to `min_ratio * peak_lr` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast_for(device: str, dtype: torch.dtype):
    """bf16 autocast over fp32 weights when a low-precision dtype is asked for, else nothing."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def clip_grad(model: torch.nn.Module, max_norm: float) -> float:
    """Clip (when max_norm > 0) and return the pre-clip gradient norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm)


# ---- run directories --------------------------------------------------------------------------
def is_done(stage_dir: str | Path, fingerprint: str | None = None) -> bool:
    marker = Path(stage_dir) / DONE_FILE
    if not marker.exists():
        return False
    return fingerprint is None or json.loads(marker.read_text()).get("fingerprint") == fingerprint


def finished_summary(stage_dir: str | Path, fingerprint: str, name: str) -> dict | None:
    """The JSON summary `name` that a run finished with these settings left in `stage_dir`,
    read back; None when the run has to be made (not done, done with other settings, or
    without that file)."""
    path = Path(stage_dir) / name
    if is_done(stage_dir, fingerprint) and path.is_file():
        return json.loads(path.read_text())
    return None


def mark_done(stage_dir: str | Path, fingerprint: str, **info) -> None:
    record = {"fingerprint": fingerprint, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    atomic_write_text(Path(stage_dir) / DONE_FILE, json.dumps(record, indent=2))


_ACTIVE_LOGGERS: list[str] = []


@contextmanager
def use_loggers(names: list[str] | None):
    """Mirror every metrics.jsonl opened inside this block to these loggers
    (`r1lab.loggers`); R1LAB_LOGGERS adds to them."""
    from r1lab.loggers import check_names

    before = list(_ACTIVE_LOGGERS)
    _ACTIVE_LOGGERS[:] = check_names(list(names or []))
    try:
        yield
    finally:
        _ACTIVE_LOGGERS[:] = before


class MetricsLog:
    """Append-only JSON lines (one record per step), flushed so a killed run keeps its log.

    A metrics.jsonl also goes to the loggers turned on (`loggers=[...]`, R1LAB_LOGGERS):
    the file is written first and stays the source of truth.
    """

    def __init__(
        self, path: str | Path, resume_step: int | None = None, loggers: list[str] | None = None
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop records past the checkpoint we resume from: they will be produced again
            # (and a torn last line, with a warning; read_jsonl names any other bad line).
            kept = [json.dumps(r) for r in read_jsonl(self.path) if r.get("step", -1) < resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.mirrors = self._open_mirrors(loggers)

    def _open_mirrors(self, loggers: list[str] | None) -> list:
        from r1lab.loggers import env_loggers, make_loggers

        if loggers is None and self.path.name != "metrics.jsonl":
            return []
        loggers = [*(loggers or []), *_ACTIVE_LOGGERS, *env_loggers()]
        if not loggers:
            return []
        saved = self.path.parent / "config.yaml"
        import yaml

        config = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
        return make_loggers(loggers, self.path.parent, config if isinstance(config, dict) else {})

    def write(self, record: dict) -> None:
        clean = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        for mirror in self.mirrors:
            mirror.log(clean)

    def close(self) -> None:
        for mirror in self.mirrors:
            mirror.close()
        self.mirrors = []


@contextmanager
def progress_bar(description: str, total: int | None):
    """A rich progress bar with ETA; yields `advance(n=1, **fields)`."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(
        *columns,
        console=console,
        transient=False,
        disable=os.environ.get("R1LAB_NO_PROGRESS") == "1",
    ) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, info=info)

        yield advance
