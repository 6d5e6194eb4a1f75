"""The one training loop of the supervised stages (pretrain and sft).

The two stages differ only in where their rows come from and which model they start from;
from packed rows onwards they train the same way, here: resume or start the run dir, then
steps until the budget (steps, or `max_minutes` of the whole stage) runs out, logging,
validating and checkpointing on the stage's schedule, then a last validation and
checkpoint. The stage writes its summary and DONE from what `train` returns.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1lab import distributed
from r1lab.config import write_config
from r1lab.model.lora import lora_modules
from r1lab.rundir import check_resumable
from r1lab.snapshot import TrainingSnapshot, restore_checkpoint, save_checkpoint, saved_state
from r1lab.stages.budget import Budget, Clock, scheduled_lr
from r1lab.stages.lm_loss import eval_loss, masked_nll, train_step
from r1lab.stages.packing import RowSampler, rows_fingerprint
from r1lab.training import (
    DONE_FILE,
    MetricsLog,
    NonFiniteLossError,
    autocast_for,
    clip_grad,
    console,
    make_optimizer,
    progress_bar,
    set_lr,
)

# Settings of a supervised stage that may change between an interrupted run and its resume.
SUPERVISED_RESUME_NEUTRAL = frozenset(
    {"device", "log_every", "eval_every", "save_every", "max_nan_steps"}
)
PROGRESS_UNITS = 1000  # the bar counts thousandths of the budget (steps or time)

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def open_checkpoint(stage: str, cfg, out: Path, resume: bool, neutral) -> dict | None:
    """The trainer record to resume from (None: start over), refused if settings differ."""
    record = saved_state(out) if resume else None
    if record is not None:
        check_resumable(stage, out, record, cfg.model_dump(mode="json"), neutral)
    return record


@dataclass
class SupervisedJob:
    """What a supervised stage hands the loop: its settings, model, rows and run dir."""

    stage: str
    cfg: Any  # the stage Config (lr, batch sizes, budget, schedule of logs and saves)
    out: Path
    model: torch.nn.Module
    tokenizer: Any
    train_rows: Rows
    val_rows: Rows | None
    total_steps: int
    record: dict | None  # from `open_checkpoint`
    device: str
    dtype: torch.dtype  # the stage's compute dtype: below fp32, autocast over fp32 weights
    started: float = field(default_factory=time.perf_counter)  # when the stage began
    export_dtype: str | None = None  # model/ is written in this dtype (None: the model's)
    describe: str = ""  # the stage's one-line description of the run, printed at the start

    @property
    def autocast(self):
        return autocast_for(self.device, self.dtype)


@dataclass
class _Progress:
    """The numbers a checkpoint carries from one session of a run to the next."""

    step: int = 0
    tokens: int = 0
    val_loss: float | None = None
    initial_val_loss: float | None = None
    setup_s: float = 0.0
    eval_s: float = 0.0
    recent: list[float] = field(default_factory=list)
    nan_streak: int = 0  # steps in a row whose loss or gradient was NaN/inf (update skipped)
    finished: bool = False  # the last checkpoint is the final one (only DONE was missing)


class _FiniteStep:
    """The optimizer as `train_step` sees it: a step whose gradients hold a NaN or an
    infinity is skipped, so the weights (and the next checkpoint) stay those of the last
    good step. `skipped` tells the loop what happened to the last step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.skipped = optimizer, False

    def step(self) -> None:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads if g is not None]
        norms = torch._foreach_norm(grads) if grads else []
        self.skipped = bool(norms) and not bool(torch.isfinite(torch.stack(norms)).all())
        if distributed.active():  # every rank skips, or none (FSDP: each holds shards)
            self.skipped = bool(distributed.all_reduce_max(float(self.skipped)))
        if not self.skipped:
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def weights_finite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity (None: all finite).

    Under FSDP each rank looks at its shards and every rank gets the same answer."""
    bad = None
    for name, p in model.named_parameters():
        local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
        if not bool(torch.isfinite(local).all()):
            bad = name
            break
    if distributed.is_sharded(model):
        return next((b for b in distributed.all_gather_objects(bad) if b is not None), None)
    return bad


def sharded_train_step(model, optimizer, batch: Rows, micro_batch_size, grad_clip, autocast):
    """`lm_loss.train_step` under torchrun: the same loss, gradient and grad norm.

    Every rank holds the whole batch and trains on its contiguous share of the rows; the
    normaliser is the target count of the whole batch (an all-reduce of the shares'
    counts). An FSDP2 model averages gradients over ranks, so its loss is multiplied by
    the world size; a model every rank holds whole (LoRA) has its gradients summed over
    ranks before clipping (`distributed.all_reduce_grads`). Every rank runs the same number
    of forwards (a rank whose share ran out runs one with a zero loss). Returns (the whole
    batch's mean target loss, grad norm).
    """
    ids, pos, mask = batch
    world = distributed.world_size()
    mine = distributed.shard_of(len(ids))
    n_targets = max(1.0, distributed.all_reduce_sum(float(mask[mine.start : mine.stop, 1:].sum())))
    size = micro_batch_size or max(1, len(distributed.shard_of(len(ids), 0, world)))
    chunks = -(-len(distributed.shard_of(len(ids), 0, world)) // size)  # rank 0 has the most
    sharded = distributed.is_sharded(model)
    scale, total = (distributed.grad_scale() if sharded else 1.0), 0.0
    for k in range(chunks):
        start = mine.start + k * size
        part = slice(start, min(start + size, mine.stop))
        empty = part.start >= part.stop
        part = slice(0, 1) if empty else part
        with autocast:
            loss = masked_nll(model, ids[part], pos[part], mask[part], normalizer=n_targets)
        (loss * (0.0 if empty else scale)).backward()
        total += 0.0 if empty else float(loss.detach())
    if not sharded:
        distributed.all_reduce_grads(model)
    grad_norm = clip_grad(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return distributed.all_reduce_sum(total), grad_norm


def _diverged(job: SupervisedJob, progress: _Progress, step: int, loss: float) -> None:
    """Count a skipped step; after `max_nan_steps` in a row, stop the stage (no DONE)."""
    progress.nan_streak += 1
    limit = getattr(job.cfg, "max_nan_steps", 3)
    console.print(
        f"[bold red]{job.stage} step {step}: loss or gradient is NaN/inf (loss {loss}); "
        f"update skipped ({progress.nan_streak} in a row)"
    )
    if progress.nan_streak >= limit:
        kept = job.out / "model" if (job.out / "state").exists() else None
        where = f"the last good checkpoint is kept in {kept}" if kept else "nothing was saved"
        raise NonFiniteLossError(
            f"{job.stage}: {progress.nan_streak} steps in a row had a NaN or infinite loss or "
            f"gradient (last: step {step}); stopped without DONE, {where}. Lower lr (now "
            f"{job.cfg.lr:g}) or set grad_clip (now {job.cfg.grad_clip:g})"
        )


def _validate(job: SupervisedJob) -> float | None:
    if job.val_rows is None:
        return None
    return eval_loss(job.model, job.val_rows, job.cfg.batch_size, job.device, job.autocast)


def _prepare_run_dir(job: SupervisedJob, snapshot) -> tuple[_Progress, dict, dict]:
    """Restore the checkpoint, or clear what a previous run left; (progress, extra, position)."""
    progress, extra, position = _Progress(), {}, {"epoch": 0, "offset": 0}
    data_hash = rows_fingerprint(*job.train_rows)
    if job.record is not None:
        info = restore_checkpoint(job.out, snapshot)
        progress.step, position, extra = info["step"], info["data_position"], info["extra"]
        if extra.get("data_hash") != data_hash:
            raise RuntimeError(
                f"{job.stage}: the data differs from the data {job.out} was trained on"
            )
        console.print(f"{job.stage}: resuming {job.out} after step {progress.step}")
    elif distributed.is_main():
        job.out.mkdir(parents=True, exist_ok=True)
        for stale in (job.out / DONE_FILE, job.out / "state"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    distributed.barrier()
    progress.tokens = extra.get("tokens", 0)
    progress.val_loss = extra.get("val_loss")
    progress.initial_val_loss = extra.get("initial_val_loss")
    progress.eval_s = extra.get("eval_s", 0.0)
    progress.recent = list(extra.get("recent_losses", []))
    progress.nan_streak = int(extra.get("nan_streak", 0))
    progress.finished = bool(extra.get("finished", False))
    extra["data_hash"] = data_hash
    return progress, extra, position


def train(job: SupervisedJob) -> dict:
    """Train `job.model` to its budget; returns the numbers of the stage summary."""
    cfg, out, model = job.cfg, job.out, job.model
    model.train()
    if distributed.active():  # torchrun: shard before the optimizer sees the parameters
        distributed.check_agreement(cfg.fingerprint())
        if not lora_modules(model):  # LoRA: every rank holds base and adapters whole
            distributed.shard_model(model)
    step_fn = sharded_train_step if distributed.active() else train_step
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    snapshot = TrainingSnapshot(model=model, optimizer=optimizer)
    progress, extra, position = _prepare_run_dir(job, snapshot)
    resumed_from = progress.step if job.record is not None else None
    log: MetricsLog | distributed.NullLog = distributed.NullLog()
    if distributed.is_main():
        write_config(cfg, out / "config.yaml")
        log = MetricsLog(
            out / "metrics.jsonl",
            resume_step=progress.step + 1 if job.record else None,
            loggers=list(getattr(cfg, "loggers", [])),
        )

    if progress.initial_val_loss is None and job.val_rows is not None:
        t0 = time.perf_counter()
        progress.initial_val_loss = _validate(job)
        progress.eval_s = time.perf_counter() - t0
    # max_minutes covers the whole stage: the setup so far, the loop, and a final validation.
    progress.setup_s = extra.get("setup_s", time.perf_counter() - job.started)
    loop_s = None
    if cfg.max_minutes:  # torchrun: the ranks' setups differ; the tightest budget holds for all
        loop_s = max(0.0, cfg.max_minutes * 60 - progress.setup_s - progress.eval_s)
        loop_s = -distributed.all_reduce_max(-loop_s)
    budget = Budget(job.total_steps, loop_s)
    sampler = RowSampler(len(job.train_rows[0]), cfg.batch_size, cfg.seed, **position)
    clock = Clock(extra.get("train_s", 0.0))
    console.print(
        f"{job.stage}: {job.describe}; {len(job.train_rows[0])} rows x {cfg.seq_len} tokens, "
        f"{job.total_steps} steps, setup {progress.setup_s:.1f}s, device {job.device}"
    )

    def checkpoint(final: bool = False) -> None:
        bad = weights_finite(model)
        if bad is not None:
            raise NonFiniteLossError(
                f"{job.stage}: the weights hold NaN/inf ({bad}) at step {progress.step}; "
                f"not saved, and no DONE: {out} keeps its last good checkpoint"
            )
        state = {
            "config": cfg.model_dump(mode="json"),
            "data_hash": extra["data_hash"],
            "setup_s": progress.setup_s,
            "eval_s": progress.eval_s,
            "train_s": clock.elapsed(),
            "tokens": progress.tokens,
            "val_loss": progress.val_loss,
            "initial_val_loss": progress.initial_val_loss,
            "recent_losses": progress.recent,
            "nan_streak": progress.nan_streak,
            "finished": final,
            "stopped_by": extra.get("stopped_by"),
        }
        save_checkpoint(
            out,
            snapshot,
            model,
            job.tokenizer,
            progress.step,
            sampler.position(),
            state,
            job.export_dtype,
        )

    session_tokens, session_start, shown = 0, time.perf_counter(), 0
    guarded = _FiniteStep(optimizer)

    def agreed_elapsed() -> float:
        """The training time every rank stops and schedules by (torchrun: the furthest
        clock), so no rank steps alone into a collective with a time budget."""
        if budget.max_seconds is None:
            return clock.elapsed()
        return distributed.all_reduce_max(clock.elapsed())

    stop = budget.stop_reason(progress.step, agreed_elapsed())
    if progress.finished:  # killed after its final checkpoint: only the summary is left
        stop = extra.get("stopped_by", stop)
    with progress_bar(job.stage, PROGRESS_UNITS) as advance:
        while not progress.finished:
            elapsed = agreed_elapsed()
            if (stop := budget.stop_reason(progress.step, elapsed)) is not None:
                break
            t0 = time.perf_counter()
            lr = scheduled_lr(cfg, budget, job.total_steps, progress.step, elapsed)
            set_lr(optimizer, lr)
            rows = sampler.next_batch()
            batch = [t[rows].to(job.device) for t in job.train_rows]
            loss, grad_norm = step_fn(
                model, guarded, batch, cfg.micro_batch_size, cfg.grad_clip, job.autocast
            )
            progress.step += 1
            step, n_tokens = progress.step, batch[0].numel()
            progress.tokens += n_tokens
            session_tokens += n_tokens
            if guarded.skipped or not math.isfinite(loss):
                _diverged(job, progress, step, loss)
            else:
                progress.nan_streak = 0
                progress.recent = (progress.recent + [loss])[-20:]
            step_time = time.perf_counter() - t0
            metrics = {
                "step": step,
                "epoch": step / sampler.steps_per_epoch,
                "loss": loss,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "step_time": step_time,
                "train/tokens_per_s": n_tokens / step_time,
                "tokens": progress.tokens,
                "elapsed_s": clock.elapsed(),
            }
            if step % cfg.eval_every == 0 and job.val_rows is not None:
                progress.val_loss = metrics["val_loss"] = _validate(job)
            log.write(metrics)
            rate = session_tokens / (time.perf_counter() - session_start)
            if step % cfg.log_every == 0:
                val = f" val {progress.val_loss:.3f}" if progress.val_loss is not None else ""
                console.print(
                    f"{job.stage} step {step}/{job.total_steps}: loss {loss:.4f}{val} "
                    f"lr {lr:.2e} grad {grad_norm:.2f} {rate:.0f} tok/s {clock.elapsed():.0f}s"
                )
            mean = sum(progress.recent) / max(1, len(progress.recent))
            now = round(PROGRESS_UNITS * budget.progress(step, clock.elapsed()))
            advance(now - shown, info=f"step {step} loss {mean:.3f} {rate / 1000:.1f}k tok/s")
            shown = now
            if step % cfg.save_every == 0:
                checkpoint()

    if not progress.finished:
        progress.val_loss = _validate(job)
        if progress.val_loss is not None:
            log.write({"step": progress.step, "val_loss": progress.val_loss})
        extra["stopped_by"] = stop
        checkpoint(final=True)
    elapsed = clock.elapsed()
    recent = progress.recent
    return {
        "steps": progress.step,
        "resumed_from": resumed_from,
        "stopped_by": stop,
        "loss": sum(recent) / len(recent) if recent else None,
        "val_loss": progress.val_loss,
        "initial_val_loss": progress.initial_val_loss,
        "tokens": progress.tokens,
        "tokens_per_s": progress.tokens / max(elapsed, 1e-9),
        "train_minutes": elapsed / 60,
    }
