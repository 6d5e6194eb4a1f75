"""`r1lab grpo`: GRPO with rule rewards, the RL of R1-Zero and of R1's later stages.

One step (R1_RECIPE.md):
1. draw Q training questions from the task mixture and render them with the template;
2. sample G completions of each at the rollout temperature (one group per question);
3. score them (accuracy + format by default; a None = "could not be judged" is logged
   with its reason and left out of the advantages);
4. advantages relative to the group: A_i = (r_i - mean) / std;
5. `mu` inner epochs over `mini_batches` mini-batches of the rollout, one optimizer step
   each, with the old-policy log-probs fixed and a k3 KL penalty to a frozen reference
   model (refreshed to the policy every `ref_refresh_every` steps; not even loaded when
   beta is 0). Each mini-batch is split into micro-batches of `micro_batch_size`
   sequences whose losses share the mini-batch's normaliser, so the gradient does not
   depend on the micro-batch size. A micro-batch's sequences are laid end to end without
   padding (`packed`, the fast path of r1lab.engine.fast_train: on CUDA, compiled and
   checkpointed layers, varlen attention, chunked log-probs through the LM head).

Old-policy log-probs: with one mini-batch and one epoch the update is on-policy, so the
old log-probs are the current ones detached (ratio exactly 1) and no extra forward is
needed. Otherwise they are recomputed once per rollout with the training forward, in the
training dtype, before the first update: the sampler's log-probs come from a KV-cache
path (and possibly another dtype), and the ratio must compare like with like. The sampler
values are only used for a diagnostic (`rollout/logprob_diff`).

The run directory holds config.yaml, metrics.jsonl, samples.jsonl, model/, state/ (one
consistent checkpoint: policy, optimizer, reference, RNG, step), eval.json and DONE.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from r1lab.config import ConfigError, StageConfig, resolve_device, resolve_dtype, write_config
from r1lab.engine import fast_train
from r1lab.engine.logprobs import token_logprobs
from r1lab.model.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)
from r1lab.model.tokenizer import load_tokenizer
from r1lab.rl import group_advantages, loss_normalizer, policy_loss, truncation_mask
from r1lab.stages.data import autocast_for
from r1lab.stages.rollout import (
    Group,
    RewardSet,
    Rollout,
    TaskMixture,
    check_judged,
    collect_rollout,
    question_key,
    rollout_metrics,
    sample_records,
)
from r1lab.training import (
    MetricsLog,
    clip_grad,
    console,
    is_done,
    lr_at,
    make_optimizer,
    mark_done,
    progress_bar,
    resolve_model_dir,
    set_cpu_threads,
    set_lr,
    set_seed,
)


class TaskSpec(BaseModel):
    """One task of the training mixture: `get_task(name, **options)`, drawn by weight."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class RewardSpec(BaseModel):
    """A reward function's weight and options (a bare number in YAML is just the weight)."""

    model_config = ConfigDict(extra="forbid")
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


class Config(StageConfig):
    """`r1lab grpo`. Defaults are the tiny CPU run (a 0.8M-parameter base, ~5 minutes).

    Step counts are rollouts: one step samples `questions_per_step` x `group_size`
    completions and makes `mu` x `mini_batches` optimizer steps on them. The presets
    r1-zero, dapo and dr-grpo hold the papers' settings for real checkpoints.
    """

    # what to train, on what
    model: str = Field("", description="model folder, hub id, or an earlier stage's run dir")
    tasks: list[TaskSpec] = Field(default_factory=lambda: [TaskSpec(name="chain_sum")])
    template: Literal["r1-zero", "r1-chat", "plain"] = "r1-zero"
    rewards: dict[str, RewardSpec] = Field(
        default_factory=lambda: {"accuracy": RewardSpec(), "format": RewardSpec()}
    )
    # rollout
    group_size: int = Field(8, ge=2)
    questions_per_step: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    rollout_batch_size: int = Field(0, ge=0, description="sequences decoded at once; 0 = all")
    dynamic_sampling: bool = False
    max_resample: int = Field(3, ge=0)
    mask_truncated: bool = False
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong penalty; 0 = off")
    overlong_penalty: float = Field(1.0, ge=0)
    # reward model (R1's last RL stage: preference rewards only late in the stage)
    reward_model: str | None = None
    reward_model_weight: float = 1.0
    reward_model_on: Literal["summary", "response"] = "summary"
    reward_model_last_steps: int | None = Field(None, ge=1)
    # optimisation
    steps: int = Field(120, ge=1)
    lr: float = Field(2e-5, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    mu: int = Field(1, ge=1, description="inner epochs over each rollout")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch of a rollout")
    micro_batch_size: int = Field(
        0, ge=0, description="sequences per forward; 0 = whole mini-batch"
    )
    packed: bool = Field(
        True,
        description="train on the sequences laid end to end without padding "
        "(r1lab.engine.fast_train); false: left/right-padded batches",
    )
    # objective
    beta: float = Field(0.001, ge=0, description="KL coefficient; 0 skips the reference model")
    eps_low: float = Field(0.2, ge=0)
    eps_high: float | None = Field(None, ge=0)
    ratio_level: Literal["token", "sequence"] = "token"
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-mean"
    )
    norm_length: float | None = Field(None, gt=0)
    adv_scale: Literal["group", "batch", "none"] = "group"
    adv_baseline: Literal["mean", "loo"] = "mean"
    ref_refresh_every: int = Field(
        400, ge=0, description="steps between reference updates; 0 = never"
    )
    # evaluation on held-out questions (the eval stage's protocol)
    eval_every: int = Field(40, ge=0, description="0 = only before and after")
    eval_n: int = Field(200, ge=1)
    eval_k: int = Field(4, ge=1)
    eval_task: TaskSpec | None = None
    eval_template: Literal["r1-zero", "r1-chat", "plain"] | None = None
    eval_temperature: float = Field(0.6, ge=0)
    eval_top_p: float = Field(0.95, gt=0, le=1)
    eval_max_new_tokens: int | None = Field(None, ge=1)
    # logging, checkpoints, limits
    log_samples: int = Field(2, ge=0)
    save_every: int = Field(40, ge=1)
    max_nan_steps: int = Field(3, ge=1)
    max_minutes: float | None = Field(None, gt=0)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_from_mapping(cls, value: Any) -> Any:
        """Also accept `{name: weight}` and a bare list of names."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, dict):
            return [{"name": k, "weight": w} for k, w in value.items()]
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("tasks")
    @classmethod
    def _some_task(cls, value: list[TaskSpec]) -> list[TaskSpec]:
        if not value:
            raise ValueError("at least one task is needed")
        return value

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_weights(cls, value: Any) -> Any:
        """`{name: weight}` or `{name: {weight, options}}`."""
        if isinstance(value, dict):
            return {
                k: {"weight": v} if isinstance(v, (int, float)) else v for k, v in value.items()
            }
        return value

    @field_validator("rewards")
    @classmethod
    def _some_reward(cls, value: dict[str, RewardSpec]) -> dict[str, RewardSpec]:
        if not value:
            raise ValueError("at least one reward function is needed")
        if not any(spec.weight != 0 for spec in value.values()):
            raise ValueError("every reward has weight 0: nothing to learn from")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        batch = self.questions_per_step * self.group_size
        if self.mini_batches > batch:
            raise ValueError(
                f"mini_batches ({self.mini_batches}) cannot exceed questions_per_step * "
                f"group_size ({batch} sequences per rollout)"
            )
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer ({self.overlong_buffer}) cannot exceed max_new_tokens ({self.max_new_tokens})"
            )
        return self


# Settings that do not change what a run computes: a run may resume under new values.
RESUME_NEUTRAL = {
    "max_minutes",
    "save_every",
    "log_samples",
    "max_nan_steps",
    "device",
    "rollout_batch_size",
}
ZERO_STD_WARN_FRAC = 0.5
ZERO_STD_WARN_EVERY = 25


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row produced a NaN or infinite loss or gradient."""


# ---- the training batch -----------------------------------------------------------------------
@dataclass
class TrainBatch:
    """The sequences of one rollout as the update sees them."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: torch.Tensor  # (N,)
    counted: list[bool]  # False: the completion's tokens are left out of the loss
    sampler_logprobs: list[list[float]]

    def __len__(self) -> int:
        return len(self.completion_ids)


def build_batch(groups: list[Group], cfg: Config) -> TrainBatch:
    """Flatten the groups to sequences and compute the group-relative advantages."""
    rewards = [r for g in groups for r in g.rewards]
    advantages = group_advantages(
        rewards, cfg.group_size, scale=cfg.adv_scale, baseline=cfg.adv_baseline
    )
    completions = [c for g in groups for c in g.completions]
    counted = [not (cfg.mask_truncated and c.finish_reason == "length") for c in completions]
    return TrainBatch(
        prompt_ids=[g.prompt_ids for g in groups for _ in g.completions],
        completion_ids=[c.token_ids for c in completions],
        advantages=advantages,
        counted=counted,
        sampler_logprobs=[c.logprobs for c in completions],
    )


def collate(batch: TrainBatch, indices: list[int], pad_id: int, device) -> dict[str, Any]:
    """Sequences laid out as [left-padded prompt | right-padded completion].

    Every completion then starts at the same column P, so the completion log-probs of the
    whole micro-batch are one slice of the model's output.
    """
    p_width = max(len(batch.prompt_ids[i]) for i in indices)
    c_width = max(max(len(batch.completion_ids[i]) for i in indices), 1)
    n = len(indices)
    ids = torch.full((n, p_width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p_width + c_width), dtype=torch.long)
    mask = torch.zeros((n, c_width), dtype=torch.bool)
    for row, i in enumerate(indices):
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        ids[row, p_width - len(p) : p_width] = torch.tensor(p, dtype=torch.long)
        ids[row, p_width : p_width + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[row, p_width - len(p) : p_width + len(c)] = 1
        mask[row, : len(c)] = True
    mask = truncation_mask(torch.tensor([not batch.counted[i] for i in indices]), mask)
    return {
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "mask": mask.to(device),
        "prompt_width": p_width,
        "advantages": batch.advantages[indices].to(device),
    }


def compute_dtype(cfg: Config, model) -> torch.dtype:
    """The dtype forwards run in: the configured one (bf16 on GPU by default).

    The policy's own weights stay fp32 (master weights): AdamW steps of lr ~1e-6 on bf16
    weights would mostly round away.
    """
    return resolve_dtype(cfg.dtype, str(model.device))


def completion_logprobs(
    model,
    mb: dict[str, Any],
    temperature: float,
    with_entropy: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the completion tokens, (n, completion width), in fp32.

    Taken under softmax(logits / temperature), the distribution the rollout sampled from,
    so that the importance ratio compares the same quantity. `dtype` below fp32 runs the
    forward under autocast.
    """
    with autocast_for(str(model.device), dtype):
        lp, ent = token_logprobs(
            model,
            mb["input_ids"],
            mb["attention_mask"],
            temperature=temperature,
            with_entropy=with_entropy,
        )
    start = mb["prompt_width"] - 1
    width = mb["mask"].shape[1]
    return lp[:, start : start + width], (
        ent[:, start : start + width] if ent is not None else None
    )


def packed_completion_logprobs(
    model,
    batch: TrainBatch,
    chunk: list[int],
    cfg: Config,
    width: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`completion_logprobs` for the sequences `chunk`, laid end to end with no padding.

    The same (n, width) layout and values as the padded path, but no compute on pad
    tokens: a rollout's completions differ in length by several times, so padding to the
    longest wastes most of a padded forward. On CUDA the decoder layers are compiled and
    checkpointed and attention is FlashAttention's varlen kernel (see fast_train).
    """
    pack = fast_train.pack_rollouts(
        [batch.prompt_ids[i] for i in chunk],
        [batch.completion_ids[i] for i in chunk],
        max_tokens=2**62,  # one pack: the micro-batch is the unit of memory here
        device=model.device,
    )[0]
    out = fast_train.packed_logprobs(
        model,
        pack,
        cfg.temperature,
        checkpoint=model.device.type == "cuda" and torch.is_grad_enabled(),
        amp=compute_dtype(cfg, model),
        with_entropy=with_entropy,
    )
    lp, ent = out if with_entropy else (out, None)

    def rows(values: torch.Tensor) -> torch.Tensor:
        r = fast_train.to_rows(values, pack)
        return torch.nn.functional.pad(r, (0, width - r.shape[1])) if r.shape[1] < width else r

    return rows(lp), (rows(ent) if ent is not None else None)


def chunk_logprobs(
    model, batch: TrainBatch, chunk: list[int], mb: dict[str, Any], cfg: Config, entropy=False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Completion log-probs (and entropies) of one micro-batch by the configured path."""
    if cfg.packed:
        return packed_completion_logprobs(model, batch, chunk, cfg, mb["mask"].shape[1], entropy)
    return completion_logprobs(model, mb, cfg.temperature, entropy, compute_dtype(cfg, model))


def micro_batches(batch: TrainBatch, indices: list[int], size: int) -> list[list[int]]:
    """Split `indices` into chunks of `size` (0 = one chunk), similar lengths together."""
    if size <= 0 or size >= len(indices):
        return [list(indices)]
    ordered = sorted(indices, key=lambda i: len(batch.prompt_ids[i]) + len(batch.completion_ids[i]))
    return [ordered[s : s + size] for s in range(0, len(ordered), size)]


def minibatch_normalizer(batch: TrainBatch, indices: list[int], cfg: Config) -> float:
    """The loss denominator of the whole mini-batch (see `r1lab.rl.loss_normalizer`)."""
    width = max(max(len(batch.completion_ids[i]) for i in indices), 1)
    mask = torch.zeros((len(indices), width), dtype=torch.bool)
    for row, i in enumerate(indices):
        if batch.counted[i]:
            mask[row, : len(batch.completion_ids[i])] = True
    return loss_normalizer(mask, cfg.aggregation, norm_length=cfg.norm_length or cfg.max_new_tokens)


@torch.no_grad()
def old_policy_logprobs(policy, batch: TrainBatch, cfg: Config, pad_id: int) -> list[torch.Tensor]:
    """Per-sequence log-probs under the current weights, before any update of this rollout."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(batch)
    for chunk in micro_batches(batch, list(range(len(batch))), cfg.micro_batch_size):
        mb = collate(batch, chunk, pad_id, policy.device)
        lp, _ = chunk_logprobs(policy, batch, chunk, mb, cfg)
        for row, i in enumerate(chunk):
            out[i] = lp[row, : len(batch.completion_ids[i])].detach()
    return out


def _pad_rows(rows: list[torch.Tensor], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32, device=device)
    for r, t in enumerate(rows):
        out[r, : t.numel()] = t.to(device=device, dtype=torch.float32)
    return out


def sampler_gap(batch: TrainBatch, indices: list[int], logprobs: list[torch.Tensor]) -> float:
    """Largest |training log-prob - sampler log-prob| over the tokens of `indices`.

    Both are log p(token) under softmax(logits / T) from the same weights; they differ
    only by the numerics of the two paths (KV cache vs full forward, dtype). About 1e-6 on
    CPU in fp32; a large value means the ratio of the first update is not 1 where it
    should be, e.g. a dtype or temperature mismatch.
    """
    gap = 0.0
    for i, lp in zip(indices, logprobs):
        sampled = torch.tensor(batch.sampler_logprobs[i], dtype=torch.float32)
        if sampled.numel():
            gap = max(gap, float((lp.detach().float().cpu() - sampled).abs().max()))
    return gap


def accumulate_gradients(
    policy,
    batch: TrainBatch,
    indices: list[int],
    cfg: Config,
    *,
    pad_id: int = 0,
    old_logprobs: list[torch.Tensor] | None = None,
    ref_model=None,
) -> dict[str, float]:
    """Backpropagate the GRPO loss of one mini-batch, micro-batch by micro-batch.

    The gradient is added to `.grad` (the caller zeroes and steps). Every micro-batch loss
    is divided by the same whole-mini-batch normaliser, so the summed gradient equals the
    one of a single pass over the mini-batch for any `micro_batch_size`.
    `old_logprobs=None` means on-policy: the current log-probs, detached. `ref_model` is
    needed when `cfg.beta` > 0.
    Returns token-weighted stats; `finite` is False (and nothing more is added) as soon as
    a micro-batch loss is NaN or infinite.
    """
    normalizer = minibatch_normalizer(batch, indices, cfg)
    sums: Counter = Counter()
    use_ref = ref_model is not None and cfg.beta > 0
    for chunk in micro_batches(batch, indices, cfg.micro_batch_size):
        mb = collate(batch, chunk, pad_id, policy.device)
        lp, ent = chunk_logprobs(policy, batch, chunk, mb, cfg, entropy=True)
        width = lp.shape[1]
        old = (
            lp.detach()
            if old_logprobs is None
            else _pad_rows([old_logprobs[i] for i in chunk], width, lp.device)
        )
        ref = None
        if use_ref:
            with torch.no_grad():
                ref, _ = chunk_logprobs(ref_model, batch, chunk, mb, cfg)
        loss, stats = policy_loss(
            lp,
            old,
            mb["advantages"],
            mb["mask"],
            ref_logprobs=ref,
            beta=cfg.beta,
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            ratio_level=cfg.ratio_level,
            aggregation=cfg.aggregation,
            normalizer=normalizer,
        )
        if not torch.isfinite(loss):
            return {"finite": False}
        loss.backward()
        if old_logprobs is None:
            rows = [lp[r, : len(batch.completion_ids[i])] for r, i in enumerate(chunk)]
            sums["logprob_diff"] = max(sums["logprob_diff"], sampler_gap(batch, chunk, rows))
        n_tok = float(mb["mask"].sum())
        sums["loss"] += float(loss.detach())
        sums["tokens"] += n_tok
        sums["entropy"] += float((ent * mb["mask"]).sum())
        for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean"):
            sums[key] += float(stats[key]) * n_tok
        sums["train_tokens"] += float(mb["attention_mask"].sum())
    tokens = max(sums["tokens"], 1.0)
    out = {
        key: sums[key] / tokens
        for key in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean")
    }
    out.update(
        loss=sums["loss"], tokens=sums["tokens"], train_tokens=sums["train_tokens"], finite=True
    )
    out["logprob_diff"] = sums["logprob_diff"]
    return out


def update_on_rollout(
    policy, optimizer, batch: TrainBatch, cfg: Config, *, step: int, pad_id: int, ref_model=None
) -> dict[str, Any]:
    """`mu` epochs x `mini_batches` optimizer steps on one rollout; averaged stats.

    A mini-batch whose loss or gradient is not finite is skipped (no optimizer step);
    `skipped` counts them.
    """
    on_policy = cfg.mu == 1 and cfg.mini_batches == 1
    old = None if on_policy else old_policy_logprobs(policy, batch, cfg, pad_id)
    gap = None if on_policy else sampler_gap(batch, list(range(len(batch))), old)
    gen = torch.Generator().manual_seed(step)
    stats: list[dict] = []
    grad_norms: list[float] = []
    skipped = 0
    policy.train()
    for _epoch in range(cfg.mu):
        order = (
            torch.randperm(len(batch), generator=gen).tolist()
            if not on_policy
            else list(range(len(batch)))
        )
        for part in range(cfg.mini_batches):
            indices = order[part :: cfg.mini_batches]
            optimizer.zero_grad(set_to_none=True)
            result = accumulate_gradients(
                policy, batch, indices, cfg, pad_id=pad_id, old_logprobs=old, ref_model=ref_model
            )
            norm = clip_grad(policy, cfg.grad_clip) if result["finite"] else math.nan
            if not result["finite"] or not math.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            stats.append(result)
            grad_norms.append(norm)
    optimizer.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"skipped": skipped, "optimizer_steps": len(stats)}
    if stats:
        for key in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "loss"):
            out[key] = sum(s[key] for s in stats) / len(stats)
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train_tokens"] = sum(s["train_tokens"] for s in stats)
        out["logprob_diff"] = gap if gap is not None else max(s["logprob_diff"] for s in stats)
    return out


# ---- signal and logs ------------------------------------------------------------------------
def warn_zero_variance(frac: float, step: int, last_warned: int | None) -> int | None:
    """A loud warning when most groups have no reward spread (no learning signal)."""
    if frac <= ZERO_STD_WARN_FRAC or (
        last_warned is not None and step - last_warned < ZERO_STD_WARN_EVERY
    ):
        return last_warned
    message = (
        f"step {step}: {100 * frac:.0f}% of the groups have zero reward variance (all "
        "completions of a question scored the same), so their advantages are 0 and they "
        "teach nothing. Look at samples.jsonl: are the rewards right? If the questions are "
        "all too easy or too hard, change the task mix, or raise group_size or temperature, "
        "or set dynamic_sampling=true."
    )
    console.print(f"[bold red]WARNING: {message}")
    return step


def console_line(step: int, total: int, m: dict[str, Any]) -> str:
    fns = " ".join(
        f"{k.split('/')[1]} {m[k]:.2f}"
        for k in m
        if k.startswith("rewards/") and k.endswith("/mean")
    )
    return (
        f"step {step}/{total} reward {m['reward']:.3f} ({fns}) zero-std {m['frac_reward_zero_std']:.2f} "
        f"len {m['completions/mean_length']:.0f} kl {m['kl']:.2e} ent {m['entropy']:.2f} "
        f"gn {m['grad_norm']:.2f} lr {m['learning_rate']:.1e} {m['step_time']:.1f}s"
    )


def _clean(record: dict) -> dict:
    """JSON-safe values: NaN and inf become None (strict JSON has no NaN)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, torch.Tensor):
            v = float(v)
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


# ---- evaluation ---------------------------------------------------------------------------
EVAL_KEYS = (
    "pass@1",
    "pass@1_stderr",
    "cons@k",
    "format_rate",
    "answer_rate",
    "mean_length",
    "truncation_rate",
    "language_consistency",
    "unjudged",
)


def evaluate_policy(rs: RunState, cfg: Config) -> dict[str, float]:
    """Held-out pass@1 etc. by the eval stage's own function and protocol (k samples, T=0.6)."""
    from r1lab.stages.evaluate import evaluate

    result = evaluate(
        rs.policy,
        rs.tokenizer,
        rs.eval_examples,
        rs.eval_task,
        template=cfg.eval_template or cfg.template,
        k=cfg.eval_k,
        temperature=cfg.eval_temperature,
        top_p=cfg.eval_top_p,
        max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
        seed=cfg.seed,
        progress=False,
    )
    return {f"eval/{k}": result[k] for k in EVAL_KEYS if result.get(k) is not None}


# ---- checkpoints ----------------------------------------------------------------------------
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


# ---- the stage ------------------------------------------------------------------------------
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
    pad_id: int
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


def load_models(cfg: Config):
    """Policy (fp32 master weights), tokenizer, reference model (None when beta is 0), optimizer."""
    if not cfg.model:
        raise ConfigError(
            "grpo config: field 'model' is required (a model folder, hub id or stage run dir)"
        )
    device = resolve_device(cfg.device)
    folder = resolve_model_dir(cfg.model)
    policy = load_model(folder, dtype=torch.float32, device=device)  # master weights
    tokenizer = load_tokenizer(folder)
    ref_model = None
    if cfg.beta > 0:  # frozen: kept in the compute dtype
        ref_model = copy.deepcopy(policy).to(compute_dtype(cfg, policy)).eval()
        ref_model.requires_grad_(False)
    optimizer = make_optimizer(policy, cfg.lr, weight_decay=cfg.weight_decay)
    return policy, tokenizer, ref_model, optimizer


def reward_sets(cfg: Config) -> tuple[RewardSet, RewardSet | None]:
    """The step's rewards, and the same plus the reward model for the late steps (if any)."""
    specs = dict(cfg.rewards)
    if cfg.overlong_buffer:
        specs["overlong_penalty"] = RewardSpec(
            options={
                "max_completion_tokens": cfg.max_new_tokens,
                "buffer_tokens": cfg.overlong_buffer,
                "penalty": cfg.overlong_penalty,
            }
        )
    try:
        base = RewardSet(specs, cfg.template)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"grpo config: field 'rewards': {_message(err)}") from None
    if not cfg.reward_model:
        return base, None
    from r1lab.rewards.reward_model import RewardModelReward
    from r1lab.stages.reward_model import RewardModelScorer

    scorer = RewardModelScorer(
        resolve_model_dir(cfg.reward_model), device=resolve_device(cfg.device)
    )
    late = RewardSet(specs, cfg.template)
    late.add(RewardModelReward(scorer, on=cfg.reward_model_on), cfg.reward_model_weight)
    return base, late


def task_sets(cfg: Config):
    """(eval task, held-out examples, training mixture without any eval question)."""
    from r1lab.tasks.base import get_task

    field = "eval_task"
    try:
        spec = cfg.eval_task or cfg.tasks[0]
        eval_task = get_task(spec.name, **spec.options)
        eval_examples = eval_task.examples("test", n=cfg.eval_n, seed=cfg.seed)
        exclude = {question_key(ex.question) for ex in eval_examples}
        field = "tasks"
        pool = min(max(cfg.steps * cfg.questions_per_step, 1000), 20000)
        mixture = TaskMixture(cfg.tasks, pool_size=pool, seed=cfg.seed, exclude=exclude)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"grpo config: field {field!r}: {_message(err)}") from None
    if mixture.removed:
        console.print(
            f"grpo: left out {mixture.removed} training questions that are in the eval set"
        )
    return eval_task, eval_examples, mixture


def _message(err: Exception) -> str:
    return str(err.args[0]) if err.args else str(err)


def _resume_mismatch(saved: dict, cfg: Config) -> list[str]:
    now = cfg.model_dump(mode="json")
    return sorted(
        k for k in set(saved) | set(now) if k not in RESUME_NEUTRAL and saved.get(k) != now.get(k)
    )


def start_run(cfg: Config, out: Path, resume: bool) -> RunState:
    """Load models, tasks and rewards; restore the last checkpoint when resuming."""
    policy, tokenizer, ref_model, optimizer = load_models(cfg)
    rewards, late_rewards = reward_sets(cfg)
    eval_task, eval_examples, mixture = task_sets(cfg)
    pad_id = policy.config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id or 0
    rs = RunState(
        policy,
        tokenizer,
        ref_model,
        optimizer,
        TrainingSnapshot(policy, optimizer, ref_model),
        mixture,
        rewards,
        late_rewards,
        eval_task,
        eval_examples,
        pad_id,
    )
    state = latest_checkpoint(out) if resume else None
    if state is not None:
        saved = (
            yaml.safe_load((out / "config.yaml").read_text())
            if (out / "config.yaml").exists()
            else {}
        )
        changed = _resume_mismatch(saved or {}, cfg)
        if changed:
            raise ConfigError(
                f"grpo: {out} holds a run with other settings ({', '.join(changed)}); "
                "use a new --out, or --no-resume to start over there"
            )
        info = load_training_state(state, optimizer=rs.snapshot)
        extra = info["extra"]
        rs.start = info["step"]
        rs.elapsed_before = float(extra.get("elapsed_s", 0.0))
        rs.nan_streak = int(extra.get("nan_streak", 0))
        rs.ref_synced_at = int(extra.get("ref_synced_at", 0))
        rs.snapshot.ref_synced = rs.ref_synced_at > 0
        rs.initial_eval, rs.last_eval = extra.get("initial_eval"), extra.get("last_eval")
        console.print(f"grpo: resuming {out} after step {rs.start}")
    rs.t_start = time.perf_counter()
    return rs


def train_step(rs: RunState, cfg: Config, step: int) -> tuple[dict, Rollout]:
    """One GRPO step: rollout, scores, advantages, update. Returns its metrics record."""
    t0 = time.perf_counter()
    refresh = cfg.ref_refresh_every and step > 1 and (step - 1) % cfg.ref_refresh_every == 0
    if rs.ref_model is not None and refresh:
        rs.ref_model.load_state_dict(rs.policy.state_dict())
        rs.ref_synced_at, rs.snapshot.ref_synced = step, True
    lr = lr_at(step - 1, cfg.steps, cfg.lr, cfg.warmup_steps, schedule=cfg.lr_schedule)
    set_lr(rs.optimizer, lr)
    late = rs.late_rewards is not None and step > cfg.steps - (
        cfg.reward_model_last_steps or cfg.steps
    )
    rollout = collect_rollout(
        rs.policy,
        rs.tokenizer,
        rs.mixture,
        rs.late_rewards if late else rs.rewards,
        step=step,
        seed=cfg.seed,
        questions=cfg.questions_per_step,
        group_size=cfg.group_size,
        template=cfg.template,
        sampling={
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
        },
        dynamic_sampling=cfg.dynamic_sampling,
        max_resample=cfg.max_resample,
        max_batch_size=cfg.rollout_batch_size or None,
    )
    check_judged(rollout, step)
    record = {"step": step, **rollout_metrics(rollout, cfg.dynamic_sampling)}

    t_train = time.perf_counter()
    upd: dict[str, Any] = {"skipped": 0, "optimizer_steps": 0}
    if rollout.groups:
        batch = build_batch(rollout.groups, cfg)
        upd = update_on_rollout(
            rs.policy, rs.optimizer, batch, cfg, step=step, pad_id=rs.pad_id, ref_model=rs.ref_model
        )
    train_s = time.perf_counter() - t_train
    record.update(
        {
            "kl": upd.get("kl", math.nan),
            "entropy": upd.get("entropy", math.nan),
            "clip_ratio/low_mean": upd.get("clip_ratio/low_mean", math.nan),
            "clip_ratio/high_mean": upd.get("clip_ratio/high_mean", math.nan),
            "grad_norm": upd.get("grad_norm", math.nan),
            "learning_rate": lr,
            "step_time": time.perf_counter() - t0,
            "rollout/tokens_per_s": record.pop("rollout/tokens_per_s"),
            "train/tokens_per_s": upd.get("train_tokens", 0) / max(train_s, 1e-9),
            "loss": upd.get("loss", math.nan),
            "rollout/logprob_diff": upd.get("logprob_diff", math.nan),
            "skipped_updates": upd["skipped"],
        }
    )
    return record, rollout


def track_nan(rs: RunState, record: dict, step: int, cfg: Config, out: Path) -> None:
    """Count steps whose every update was skipped for a NaN/inf; stop after too many."""
    if not record["skipped_updates"]:
        rs.nan_streak = 0
        return
    rs.nan_streak += 1
    console.print(
        f"[bold red]step {step}: loss or gradient is NaN/inf; update skipped ({rs.nan_streak} in a row)"
    )
    if rs.nan_streak >= cfg.max_nan_steps:
        raise NonFiniteLossError(
            f"{rs.nan_streak} steps in a row had a NaN or infinite loss or gradient (last: step {step}); "
            f"stopping. The last checkpoint is in {out / 'state'}. Lower lr (now {cfg.lr:g}), check "
            "grad_clip, and look at samples.jsonl for degenerate completions."
        )


def run(cfg: Config, out_dir: str | Path, resume: bool = True) -> dict:
    """Train with GRPO; returns the summary also written to DONE."""
    out = Path(out_dir)
    fingerprint = cfg.fingerprint()
    if resume and is_done(out, fingerprint):
        console.print(f"grpo: {out} is already done (DONE matches this config)")
        return json.loads((out / "DONE").read_text())
    set_cpu_threads()
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    rs = start_run(cfg, out, resume)
    write_config(cfg, out / "config.yaml")
    keep = rs.start + 1 if rs.start else None
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=keep)
    samples = MetricsLog(out / "samples.jsonl", resume_step=keep)

    if rs.initial_eval is None:
        rs.initial_eval = rs.last_eval = evaluate_policy(rs, cfg)
        metrics.write(_clean({"step": 0, **rs.initial_eval}))
        console.print(
            f"grpo: before RL, held-out pass@1 {rs.initial_eval.get('eval/pass@1', math.nan):.3f}"
        )

    stopped, step = None, rs.start
    with progress_bar("grpo", cfg.steps) as advance:
        advance(rs.start)
        for step in range(rs.start + 1, cfg.steps + 1):
            record, rollout = train_step(rs, cfg, step)
            rs.last_warned = warn_zero_variance(
                record["frac_reward_zero_std"], step, rs.last_warned
            )
            if (
                cfg.max_minutes is not None
                and rs.elapsed() > 60 * cfg.max_minutes
                and step < cfg.steps
            ):
                stopped = f"time budget of {cfg.max_minutes:g} min reached after step {step}"
            if stopped or step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                rs.last_eval = evaluate_policy(rs, cfg)
                record.update(rs.last_eval)
            metrics.write(_clean(record))
            for s in sample_records(rollout, step, cfg.log_samples):
                samples.write(_clean(s))
            console.print(console_line(step, cfg.steps, record))
            advance(1)
            track_nan(rs, record, step, cfg, out)
            if stopped or step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(
                    out, rs.snapshot, rs.tokenizer, step, rs.extra(), compute_dtype(cfg, rs.policy)
                )
            if stopped:
                console.print(f"[yellow]grpo: {stopped}; stopping")
                break

    summary = {
        "stage": "grpo",
        "steps": step,
        "steps_planned": cfg.steps,
        "stopped_early": stopped,
        "minutes": round(rs.elapsed() / 60, 2),
        "pass@1_before": rs.initial_eval.get("eval/pass@1"),
        "pass@1_after": rs.last_eval.get("eval/pass@1"),
        "initial": rs.initial_eval,
        "final": rs.last_eval,
    }
    report = {"initial": rs.initial_eval, "final": rs.last_eval, "steps": step}
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
    mark_done(out, fingerprint, **summary)
    console.print(
        f"grpo: done after {step} steps, {summary['minutes']:.1f} min; held-out pass@1 "
        f"{summary['pass@1_before']} -> {summary['pass@1_after']}"
    )
    return summary
