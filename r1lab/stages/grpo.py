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
   beta is 0).

Steps 1-3 are `r1lab.stages.rollout` (through `r1lab.stages.judging`, the eval stage's
sampling and judging); step 5 is `r1lab.engine.grpo_update.update_on_rollout` (micro-batches,
packed sequences, old-policy and reference log-probs), the function the GRPO benchmark
times. The settings are `r1lab.stages.grpo_config.Config`; this file reads top to bottom:
load, loop, save.

The run directory holds config.yaml, metrics.jsonl, samples.jsonl, model/, state/ (one
consistent checkpoint: policy, optimizer, reference, RNG, step), eval.json and DONE.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from r1lab import distributed
from r1lab.config import ConfigError, resolve_device, resolve_dtype, write_config
from r1lab.distributed import NullLog
from r1lab.engine import fast_generate
from r1lab.engine.grpo_update import UpdateSettings, update_on_rollout
from r1lab.model.checkpoint import atomic_write_text, load_model
from r1lab.model.tokenizer import load_tokenizer, render_prompt
from r1lab.rundir import check_resumable
from r1lab.snapshot import TrainingSnapshot, restore_checkpoint, save_checkpoint, saved_state
from r1lab.stages import grpo_lora
from r1lab.stages.grpo_config import RESUME_NEUTRAL, Config
from r1lab.stages.grpo_state import RunState
from r1lab.stages.judging import RewardSet, RewardSpec, prompt_template
from r1lab.stages.rollout import (
    Rollout,
    TaskMixture,
    check_judged,
    collect_rollout,
    console_line,
    merge_metrics,
    question_key,
    rollout_metrics,
    sample_records,
    step_batch,
    warn_zero_variance,
)
from r1lab.stages.task_spec import TaskSpec
from r1lab.training import (
    MetricsLog,
    NonFiniteLossError,
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

__all__ = ["Config", "NonFiniteLossError", "RewardSpec", "TaskSpec", "run"]


# ---- load -------------------------------------------------------------------------------------
def load_models(cfg: Config):
    """Policy (fp32 master weights), tokenizer, reference model (None when beta is 0), optimizer,
    and under torchrun (policy sharded by FSDP2) the whole copy that samples, else None."""
    if not cfg.model:
        raise ConfigError(
            "grpo config: field 'model' is required (a model folder, hub id or stage run dir)"
        )
    # torchrun: this rank's GPU by index ("cuda" alone loads safetensors onto cuda:0)
    device = distributed.local_device(resolve_device(cfg.device))
    if cfg.lora is not None:  # frozen base, adapters; reference and sampler share the base
        return grpo_lora.load_models(cfg, device)
    folder = resolve_model_dir(cfg.model)
    policy = load_model(folder, dtype=torch.float32, device=device)  # master weights
    tokenizer = load_tokenizer(folder)
    ref_model = None
    if cfg.beta > 0:  # frozen: kept in the compute dtype
        ref_model = copy.deepcopy(policy).to(compute_dtype(cfg, policy)).eval()
        ref_model.requires_grad_(False)
    sampler = None
    if distributed.active():
        sampler = copy.deepcopy(policy).to(compute_dtype(cfg, policy)).eval()
        distributed.shard_model(policy.requires_grad_(True))
        if ref_model is not None:  # sharded too: its whole copy is 15 GB a rank at 7B
            distributed.shard_model(ref_model, ref_model.dtype, reshard_root=True)
    optimizer = make_optimizer(policy, cfg.lr, weight_decay=cfg.weight_decay)
    return policy, tokenizer, ref_model, optimizer, sampler


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
        resolve_model_dir(cfg.reward_model),
        device=distributed.local_device(resolve_device(cfg.device)),
    )
    late = RewardSet(specs, cfg.template)
    late.add(RewardModelReward(scorer, on=cfg.reward_model_on), cfg.reward_model_weight)
    return base, late


def task_sets(cfg: Config):
    """(eval task, held-out examples, training mixture without any eval question)."""
    field = "eval_task"
    try:
        eval_task = (cfg.eval_task or cfg.tasks[0]).task()
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


def open_checkpoint(cfg: Config, out: Path, resume: bool) -> dict | None:
    """The trainer record to resume from (None: start over), refused if settings differ."""
    record = saved_state(out) if resume else None
    if record is not None:
        extra = record.setdefault("extra", {})
        if "config" not in extra:  # checkpoints written before they carried their settings
            saved = out / "config.yaml"
            extra["config"] = yaml.safe_load(saved.read_text()) if saved.exists() else {}
        check_resumable("grpo", out, record, cfg.model_dump(mode="json"), RESUME_NEUTRAL)
    return record


def start_run(cfg: Config, out: Path, resume: bool) -> RunState:
    """Load models, tasks and rewards; restore the last checkpoint when resuming."""
    policy, tokenizer, ref_model, optimizer, sampler = load_models(cfg)
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
        TrainingSnapshot(policy=grpo_lora.trained_part(policy), optimizer=optimizer, ref=None),
        mixture,
        rewards,
        late_rewards,
        eval_task,
        eval_examples,
        update_settings(cfg, policy, pad_id),
    )
    rs.sampler = sampler  # torchrun: the whole copy that samples (None: the policy does)
    rs.template = prompt_template(cfg.template, cfg.system_prompt, cfg.instruction)[0]
    render_prompt(rs.template, "?", tokenizer)  # a chat template the tokenizer lacks: say now
    record = open_checkpoint(cfg, out, resume)
    if record is not None:
        if int(record["extra"].get("ref_synced_at", 0)) > 0:
            rs.snapshot.parts["ref"] = ref_model
        info = restore_checkpoint(out, rs.snapshot)
        extra = info["extra"]
        rs.start = info["step"]
        rs.elapsed_before = float(extra.get("elapsed_s", 0.0))
        rs.nan_streak = int(extra.get("nan_streak", 0))
        rs.ref_synced_at = int(extra.get("ref_synced_at", 0))
        rs.initial_eval, rs.last_eval = extra.get("initial_eval"), extra.get("last_eval")
        console.print(f"grpo: resuming {out} after step {rs.start}")
    rs.t_start = time.perf_counter()
    return rs


def compute_dtype(cfg: Config, model) -> torch.dtype:
    """The dtype forwards run in: the configured one (bf16 on GPU by default).

    The policy's own weights stay fp32 (master weights): AdamW steps of lr ~1e-6 on bf16
    weights would mostly round away.
    """
    return resolve_dtype(cfg.dtype, str(model.device))


def update_settings(cfg: Config, policy, pad_id: int) -> UpdateSettings:
    """The update's share of the config, as explicit values."""
    return UpdateSettings(
        temperature=cfg.temperature,
        beta=cfg.beta,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        ratio_level=cfg.ratio_level,
        aggregation=cfg.aggregation,
        norm_length=cfg.norm_length or cfg.max_new_tokens,
        mu=cfg.mu,
        mini_batches=cfg.mini_batches,
        micro_batch_size=cfg.micro_batch_size,
        grad_clip=cfg.grad_clip,
        packed=cfg.packed,
        checkpoint_layers=cfg.checkpoint_layers,
        compute_dtype=compute_dtype(cfg, policy),
        pad_id=pad_id,
    )


# ---- loop ---------------------------------------------------------------------------------
def train_step(rs: RunState, cfg: Config, step: int) -> tuple[dict, Rollout]:
    """One GRPO step: rollout, scores, advantages, update. Returns its metrics record."""
    t0 = time.perf_counter()
    on_gpu = rs.policy.device.type == "cuda"
    if on_gpu:  # the step's own peak (`peak_memory_gb`)
        torch.cuda.reset_peak_memory_stats(rs.policy.device)
    refresh = cfg.ref_refresh_every and step > 1 and (step - 1) % cfg.ref_refresh_every == 0
    if rs.ref_model is not None and refresh:
        distributed.copy_weights(rs.ref_model, rs.policy)
        rs.ref_synced_at, rs.snapshot.parts["ref"] = step, rs.ref_model
    lr = lr_at(step - 1, cfg.steps, cfg.lr, cfg.warmup_steps, schedule=cfg.lr_schedule)
    set_lr(rs.optimizer, lr)
    late = rs.late_rewards is not None and step > cfg.steps - (
        cfg.reward_model_last_steps or cfg.steps
    )
    sampler = rs.sampler or rs.policy
    grpo_lora.refresh_sampler(rs.sampler, rs.policy)  # LoRA merged, or torchrun's whole copy
    rollout = collect_rollout(
        sampler,
        rs.tokenizer,
        rs.mixture,
        rs.late_rewards if late else rs.rewards,
        step=step,
        seed=cfg.seed,
        questions=cfg.questions_per_step,
        group_size=cfg.group_size,
        template=rs.template,
        sampling={
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
        },
        dynamic_sampling=cfg.dynamic_sampling,
        max_resample=cfg.max_resample,
        max_batch_size=cfg.rollout_batch_size or None,
        rank=distributed.rank(),
        world=distributed.world_size(),
        warn_context=step == rs.start + 1,  # prompts beyond the context: said once
    )
    # the engine's weight copy and KV cache are not needed to train (at 7B they hold ~24 GB
    # through the update); it is rebuilt at the next rollout, as benchmarks/grpo_step.py times
    fast_generate.release(sampler)
    check_judged(rollout, step)
    record = rollout_metrics(rollout, cfg.dynamic_sampling)
    record = {"step": step, **merge_metrics(record, len(rollout.sampled))}

    t_train = time.perf_counter()
    upd: dict[str, Any] = {"skipped": 0, "optimizer_steps": 0}
    batch = step_batch(  # torchrun: every rank's groups, in one process's order
        rollout.groups,
        group_size=cfg.group_size,
        adv_scale=cfg.adv_scale,
        adv_baseline=cfg.adv_baseline,
        mask_truncated=cfg.mask_truncated,
    )
    if batch is not None:
        upd = update_on_rollout(
            rs.policy, rs.optimizer, batch, rs.update, step=step, ref_model=rs.ref_model
        )
    if on_gpu:  # the optimizer step's kernels belong to this step's time
        torch.cuda.synchronize(rs.policy.device)
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
            "rollout_time": t_train - t0,
            "train_time": train_s,
            "rollout/tokens_per_s": record.pop("rollout/tokens_per_s"),
            "train/tokens_per_s": upd.get("train_tokens", 0) / max(train_s, 1e-9),
            "loss": upd.get("loss", math.nan),
            "rollout/logprob_diff": upd.get("logprob_diff", math.nan),
            "skipped_updates": upd["skipped"],
        }
    )
    if "checkpointed_layers" in upd:  # on a GPU: the layers the update recomputed
        record["checkpointed_layers"] = upd["checkpointed_layers"]
    if on_gpu:  # the most any rank's GPU held during the step
        peak = torch.cuda.max_memory_allocated(rs.policy.device) / 2**30
        record["peak_memory_gb"] = distributed.all_reduce_max(peak)
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
    distributed.check_agreement(fingerprint)
    if cfg.questions_per_step < distributed.world_size():
        raise ConfigError("grpo config: questions_per_step is below the number of ranks")
    if resume and is_done(out, fingerprint):
        console.print(f"grpo: {out} is already done (DONE matches this config)")
        return json.loads((out / "DONE").read_text())
    set_cpu_threads()
    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    rs = start_run(cfg, out, resume)
    keep = rs.start + 1 if rs.start else None
    main = distributed.is_main()  # one rank writes the run dir
    if main:
        write_config(cfg, out / "config.yaml")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=keep) if main else NullLog()
    samples = MetricsLog(out / "samples.jsonl", resume_step=keep) if main else NullLog()

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
                and distributed.all_reduce_max(rs.elapsed()) > 60 * cfg.max_minutes  # one clock
                and step < cfg.steps
            ):
                stopped = f"time budget of {cfg.max_minutes:g} min reached after step {step}"
            if stopped or step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                rs.last_eval = evaluate_policy(rs, cfg)
                record.update(rs.last_eval)
            metrics.write(_clean(record))
            for s in sample_records(rollout, step, cfg.log_samples):
                samples.write(_clean(s))
            if main:
                console.print(console_line(step, cfg.steps, record))
            advance(1)
            track_nan(rs, record, step, cfg, out)
            if stopped or step % cfg.save_every == 0 or step == cfg.steps:
                extra = {"config": cfg.model_dump(mode="json"), **rs.extra()}
                dtype = compute_dtype(cfg, rs.policy)
                grpo_lora.save_adapter(rs.policy, out, cfg.model)  # LoRA: adapter/, PEFT layout
                save_checkpoint(out, rs.snapshot, rs.policy, rs.tokenizer, step, step, extra, dtype)
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
    if main:
        atomic_write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
        mark_done(out, fingerprint, **summary)
    distributed.barrier()
    console.print(
        f"grpo: done after {step} steps, {summary['minutes']:.1f} min; held-out pass@1 "
        f"{summary['pass@1_before']} -> {summary['pass@1_after']}"
    )
    return summary


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

    grpo_lora.refresh_sampler(rs.sampler, rs.policy)  # LoRA merged, or torchrun's whole copy
    result = evaluate(  # torchrun: each rank samples its share of the questions
        rs.sampler or rs.policy,
        rs.tokenizer,
        rs.eval_examples,
        rs.eval_task,
        template=cfg.eval_template or cfg.template,
        system_prompt=cfg.system_prompt,
        instruction=cfg.instruction,
        k=cfg.eval_k,
        temperature=cfg.eval_temperature,
        top_p=cfg.eval_top_p,
        max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
        seed=cfg.seed,
        progress=False,
    )
    fast_generate.release(rs.sampler or rs.policy)  # its rows and length are the eval's, not GRPO's
    return {f"eval/{k}": result[k] for k in EVAL_KEYS if result.get(k) is not None}


# ---- records (checkpoints: r1lab.snapshot) --------------------------------------------------
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
