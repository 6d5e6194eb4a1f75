"""Supervised fine-tuning on prompt/response pairs: cold start, rejection-sampling SFT, distillation.

The R1 recipe fine-tunes three times with the same loss: the cold start (a few thousand
readable chains of thought before reasoning RL), the SFT on rejection-sampled outputs of the
RL checkpoint (plus non-reasoning data), and distillation (a smaller base model fine-tuned on
the big reasoner's samples). Only the data and the starting model differ, so one stage serves
all three: `model` is the starting point, `data` the list of sources.

The loss is the mean negative log-likelihood of the response tokens only (the prompt is
context, not a target), each response ending with EOS so the model learns to stop. Examples
are packed whole into rows with attention kept inside each one.

Reads top to bottom: config -> data -> model -> loop -> save.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from r1lab.config import resolve_device, resolve_dtype, write_config
from r1lab.model.checkpoint import load_model
from r1lab.model.config import ModelConfig
from r1lab.model.tokenizer import load_tokenizer
from r1lab.stages.data import (
    Budget,
    Clock,
    ProceduralConfig,
    RowSampler,
    autocast_for,
    check_resumable,
    eval_loss,
    find_model,
    load_source,
    mix_sources,
    pack_rows,
    restore_checkpoint,
    rows_fingerprint,
    save_checkpoint,
    saved_state,
    tokenize_examples,
    train_step,
)
from r1lab.training import (
    DONE_FILE,
    MetricsLog,
    console,
    is_done,
    lr_at,
    make_optimizer,
    mark_done,
    progress_bar,
    set_cpu_threads,
    set_lr,
    set_seed,
)

STAGE = "sft"
RESUME_NEUTRAL = {"device", "log_every", "eval_every", "save_every"}


class Config(ProceduralConfig):
    """`r1lab sft`. The defaults are the tiny CPU cold start (about a minute on 2 cores)."""

    model: str  # the starting model: a model folder, a stage run dir or a Hub id

    # data: each source is a built-in generator, a .jsonl with prompt/response, or a dataset id
    data: list[str] = Field(default_factory=lambda: ["cold-start"], min_length=1)
    data_weights: list[float] | None = None  # share of each source in the mixture
    n_examples: int = Field(default=2000, ge=1)  # per built-in source
    val_examples: int = Field(default=100, ge=0)  # held out from the mixture for val_loss

    # optimisation
    seq_len: int = Field(default=256, ge=8)
    batch_size: int = Field(default=16, ge=1)  # rows per optimizer step
    micro_batch_size: int | None = Field(default=None, ge=1)  # rows per forward (memory)
    epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # cap on optimizer steps
    max_minutes: float | None = Field(default=None, gt=0)  # wall-clock cap of the loop
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine to a tenth (R1 recipe)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, ge=0)
    gradient_checkpointing: bool = False

    # logging and checkpoints
    log_every: int = Field(default=10, ge=1)
    eval_every: int = Field(default=50, ge=1)
    save_every: int = Field(default=100, ge=1)

    @field_validator("data", mode="before")
    @classmethod
    def _data_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) else value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.data_weights is not None and (
            len(self.data_weights) != len(self.data) or min(self.data_weights) <= 0
        ):
            raise ValueError("data_weights needs one positive weight per entry of data")
        return self


# ---- data ------------------------------------------------------------------------------------
def load_examples(cfg: Config, tokenizer) -> list[dict]:
    """Every source read and checked, then mixed; errors name the source, line and field."""
    options = {
        "families": cfg.families,
        "levels": cfg.levels,
        "n": cfg.n_examples,
        "zh_fraction": cfg.zh_fraction,
        "seed": cfg.seed,
    }
    sources = [load_source(spec, tokenizer, **options) for spec in cfg.data]
    return mix_sources(sources, cfg.data_weights, cfg.seed)


def build_rows(cfg: Config, examples: list[dict], tokenizer, pad_id: int):
    """(train rows, val rows or None, stats): tokenized, prompt-masked, packed examples."""
    n_val = min(cfg.val_examples, len(examples) // 10)
    docs, masks, cut = tokenize_examples(examples, tokenizer, cfg.seq_len)
    if not docs:
        raise ValueError(f"sft: no example has a response token within seq_len={cfg.seq_len}")
    n_val = min(n_val, len(docs) - 1)
    train = pack_rows(docs[n_val:], masks[n_val:], cfg.seq_len, pad_id)
    val = pack_rows(docs[:n_val], masks[:n_val], cfg.seq_len, pad_id) if n_val else None
    stats = {
        "examples": len(docs) - n_val,
        "val_examples": n_val,
        "truncated": cut,
        "dropped": len(examples) - len(docs),
        "response_tokens": int(train[2].sum()),
    }
    return train, val, stats


def stored_dtype(folder: Path) -> str | None:
    """The dtype the base checkpoint was saved in: the fine-tuned model is written the same
    way (a bf16 checkpoint stays bf16), while training and state/ keep fp32 weights."""
    extra = ModelConfig.from_file(folder / "config.json").extra
    return extra.get("dtype") or extra.get("torch_dtype")


# ---- the stage ---------------------------------------------------------------------------------
def run(cfg: Config, out_dir: str | Path, resume: bool = True) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` into `out_dir/model`; returns the stage summary."""
    out = Path(out_dir)
    if resume and is_done(out, cfg.fingerprint()):
        console.print(f"sft: {out} is done; reusing it")
        return json.loads((out / DONE_FILE).read_text())

    set_cpu_threads()
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    autocast = autocast_for(device, dtype)
    settings = cfg.model_dump(mode="json")
    record = saved_state(out) if resume else None
    if record is not None:
        check_resumable(STAGE, out, record, settings, RESUME_NEUTRAL)

    # data first: a bad source fails before anything is written
    source = find_model(cfg.model)
    tokenizer = load_tokenizer(source)
    examples = load_examples(cfg, tokenizer)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    train_rows, val_rows, stats = build_rows(cfg, examples, tokenizer, pad_id)
    data_hash = rows_fingerprint(*train_rows)

    # model and optimizer (fp32 weights; bf16 autocast on GPU)
    model = load_model(source, dtype=torch.float32, device=device)
    export_dtype = stored_dtype(source)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    sampler = RowSampler(len(train_rows[0]), cfg.batch_size, cfg.seed)
    total_steps = cfg.epochs * sampler.steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    step, extra = 0, {}
    resumed_from = None
    if record is not None:
        info = restore_checkpoint(out, model, optimizer)
        step, extra = info["step"], info["extra"]
        sampler = RowSampler(len(train_rows[0]), cfg.batch_size, cfg.seed, **info["data_position"])
        if extra.get("data_hash") != data_hash:
            raise RuntimeError(f"sft: the data differs from the data {out} was trained on")
        console.print(f"sft: resuming {out} after step {step}")
        resumed_from = step
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / DONE_FILE, out / "state"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    write_config(cfg, out / "config.yaml")
    log = MetricsLog(out / "metrics.jsonl", resume_step=step + 1 if record else None)

    budget = Budget(total_steps, cfg.max_minutes * 60 if cfg.max_minutes else None)
    console.print(
        f"sft: {source} ({model.num_parameters():,} parameters) on {', '.join(cfg.data)}: "
        f"{stats['examples']} examples ({stats['truncated']} cut at {cfg.seq_len} tokens, "
        f"{stats['dropped']} dropped) in {len(train_rows[0])} rows, {cfg.epochs} epochs = "
        f"{total_steps} steps, device {device}"
    )
    clock = Clock(extra.get("train_s", 0.0))
    tokens = extra.get("tokens", 0)
    val_loss = extra.get("val_loss")
    initial_val = extra.get("initial_val_loss")
    if initial_val is None and val_rows is not None:
        initial_val = eval_loss(model, val_rows, cfg.batch_size, device, autocast)
    recent: list[float] = []
    session_tokens, session_start = 0, time.perf_counter()

    def checkpoint() -> None:
        saved = {
            "config": settings,
            "data_hash": data_hash,
            "train_s": clock.elapsed(),
            "tokens": tokens,
            "val_loss": val_loss,
            "initial_val_loss": initial_val,
        }
        save_checkpoint(
            out, model, optimizer, tokenizer, step, sampler.position(), saved, export_dtype
        )

    def validate() -> float | None:
        if val_rows is None:
            return None
        return eval_loss(model, val_rows, cfg.batch_size, device, autocast)

    with progress_bar("sft", total_steps) as advance:
        advance(step)
        while (stop := budget.stop_reason(step, clock.elapsed())) is None:
            t0 = time.perf_counter()
            position = max(step, budget.progress(step, clock.elapsed()) * total_steps)
            lr = lr_at(position, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            set_lr(optimizer, lr)
            rows = sampler.next_batch()
            batch = [t[rows].to(device) for t in train_rows]
            loss, grad_norm = train_step(
                model, optimizer, batch, cfg.micro_batch_size, cfg.grad_clip, autocast
            )
            step += 1
            n_tokens = batch[0].numel()
            tokens, session_tokens = tokens + n_tokens, session_tokens + n_tokens
            recent = (recent + [loss])[-20:]
            step_time = time.perf_counter() - t0
            metrics = {
                "step": step,
                "epoch": step / sampler.steps_per_epoch,
                "loss": loss,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "step_time": step_time,
                "train/tokens_per_s": n_tokens / step_time,
                "tokens": tokens,
                "elapsed_s": clock.elapsed(),
            }
            if step % cfg.eval_every == 0 and val_rows is not None:
                val_loss = metrics["val_loss"] = validate()
            log.write(metrics)
            rate = session_tokens / (time.perf_counter() - session_start)
            if step % cfg.log_every == 0:
                val = f" val {val_loss:.3f}" if val_loss is not None else ""
                console.print(
                    f"sft step {step}/{total_steps}: loss {loss:.4f}{val} lr {lr:.2e} "
                    f"grad {grad_norm:.2f} {rate:.0f} tok/s {clock.elapsed():.0f}s"
                )
            mean = sum(recent) / len(recent)
            advance(1, info=f"loss {mean:.3f} {rate / 1000:.1f}k tok/s")
            if step % cfg.save_every == 0:
                checkpoint()

    if stop == "max_steps" and total_steps == cfg.epochs * sampler.steps_per_epoch:
        stop = "epochs"
    val_loss = validate()
    if val_loss is not None:
        log.write({"step": step, "val_loss": val_loss})
    checkpoint()
    elapsed = clock.elapsed()
    summary = {
        "stage": STAGE,
        "model": str(out / "model"),
        "base": str(source),
        "data": list(cfg.data),
        "steps": step,
        "resumed_from": resumed_from,
        "stopped_by": stop,
        "loss": sum(recent) / len(recent) if recent else None,
        "val_loss": val_loss,
        "initial_val_loss": initial_val,
        "tokens": tokens,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "train_minutes": elapsed / 60,
        **stats,
    }
    before = f"{initial_val:.3f} -> " if initial_val is not None else ""
    after = f"{val_loss:.3f}" if val_loss is not None else "n/a"
    console.print(
        f"sft: {step} steps ({stop}); val loss {before}{after}, "
        f"{summary['tokens_per_s']:.0f} tok/s, {elapsed / 60:.1f} min of training"
    )
    mark_done(out, cfg.fingerprint(), **summary)
    return summary
