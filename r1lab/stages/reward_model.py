"""`r1lab reward-model`: a Bradley-Terry reward model on preference pairs.

R1's last RL stage adds reward models for general data: helpfulness judged on the final
summary only (the text after `</think>`), harmlessness on the whole response. This stage
trains such a model: the decoder with a scalar head on the last token, loss
-log sigmoid(r_chosen - r_rejected), and reports held-out pair accuracy.

Data: jsonl files of `{prompt, chosen, rejected}`, a Hugging Face dataset id with those
columns, or "procedural": pairs made from the built-in tasks, where a clear, correct
summary is preferred over a wrong, hedging or unhelpful one.

Weights train in fp32 under the stage's autocast dtype, as sft's do. Checkpoints (`model/`
with the head, then `state/`) go through `r1lab.snapshot` every `save_every` steps and at
the end, so a killed run resumes. Under torchrun (`r1lab reward-model --nproc N`) FSDP2
shards the model and each rank scores its share of every batch of pairs (`train_step`):
the losses and weights are the one-process ones, and the checkpoints resume on any number
of ranks (docs/distributed.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from r1lab import distributed, training
from r1lab.config import resolve_device, resolve_dtype, write_config
from r1lab.model.checkpoint import (
    atomic_dir,
    atomic_write_text,
    load_model,
    resolve_model_dir,
    save_model,
)
from r1lab.model.tokenizer import load_tokenizer
from r1lab.rewards.reward_model import text_to_judge
from r1lab.rows import DataError, read_hub_rows, read_rows
from r1lab.snapshot import Export, TrainingSnapshot, restore_checkpoint, save_checkpoint
from r1lab.stages.budget import Clock
from r1lab.stages.data import ProceduralConfig
from r1lab.stages.sft import stored_dtype
from r1lab.stages.supervised import open_checkpoint

STAGE = "reward-model"
HEAD_FILE = "reward_head.safetensors"
PAIR_SIDES = ("chosen", "rejected")
HEAD_INFO = "reward_head.json"
# Settings that may change between an interrupted run and its resume (r1lab.rundir).
RESUME_NEUTRAL = frozenset({"device", "log_every", "save_every"})


class Config(ProceduralConfig):
    model: str = Field("", description="decoder to start from: model folder or stage run dir")
    data: list[str] = Field(default_factory=lambda: ["procedural"])
    n_pairs: int = Field(3000, ge=10)
    judge: Literal["summary", "response"] = "summary"
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    max_length: int = Field(192, ge=8)
    max_minutes: float | None = Field(None, gt=0)
    log_every: int = Field(20, ge=1)
    save_every: int = Field(100, ge=1)  # steps between checkpoints (resume points)


# ---- the model ---------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """A decoder whose last-token hidden state goes through a scalar head."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.score = nn.Linear(decoder.config.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / decoder.config.hidden_size**0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded batch -> one reward per row, read at its last real token."""
        hidden = self.decoder.hidden_states(input_ids, attention_mask=attention_mask)
        last = attention_mask.long().sum(1) - 1
        scores = self.score(hidden[torch.arange(len(last)), last].float())
        return scores.squeeze(-1).clone()  # not a view: FSDP2 hooks the output for backward


def save_reward_model(rm: RewardModel, path: str | Path, tokenizer, judge: str) -> None:
    """The decoder as a Hugging Face folder plus the head beside it (loadable on its own)."""
    _write_reward_model(rm.decoder, rm.score.weight, path, tokenizer, judge)


def _write_reward_model(decoder, head: torch.Tensor, path, tokenizer, judge: str, dtype=None):
    """One folder, written atomically: the decoder (in `dtype`), the head and its judge."""
    with atomic_dir(path) as tmp:
        save_model(decoder, tmp, tokenizer=tokenizer, dtype=dtype)
        weights = {"score.weight": head.detach().float().cpu().contiguous()}
        save_file(weights, str(tmp / HEAD_FILE))
        (tmp / HEAD_INFO).write_text(json.dumps({"judge": judge}) + "\n")


def reward_model_export(config, tokenizer, judge: str, dtype=None) -> Export:
    """`save_checkpoint`'s writer of `model/`: the reward model's folder from its whole
    weights by name (a plain decoder rebuilt from the `decoder.` ones, and the head)."""

    def export(weights: dict[str, torch.Tensor], folder: Path) -> None:
        prefix = "decoder."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        decoder = distributed.plain_model(config, own, "cpu")
        _write_reward_model(decoder, weights["score.weight"], folder, tokenizer, judge, dtype)

    return export


def load_reward_model(path: str | Path, device: str = "cpu") -> tuple[RewardModel, object, str]:
    """(reward model, tokenizer, judge) from a folder written by `save_reward_model`."""
    folder = resolve_model_dir(path)
    if not (folder / HEAD_FILE).exists():
        raise FileNotFoundError(f"{folder / HEAD_FILE} not found: {folder} is not a reward model")
    rm = RewardModel(load_model(folder, device=device))
    rm.score.weight.data.copy_(load_file(str(folder / HEAD_FILE))["score.weight"])
    rm.to(device).eval()
    judge = (
        json.loads((folder / HEAD_INFO).read_text())["judge"]
        if (folder / HEAD_INFO).exists()
        else "summary"
    )
    return rm, load_tokenizer(folder), judge


class RewardModelScorer:
    """`scorer(prompts, texts) -> list[float]`: the callable the GRPO reward hook wraps."""

    def __init__(
        self, path: str | Path, device: str = "cpu", batch_size: int = 64, max_length: int = 512
    ):
        self.model, self.tokenizer, self.judge = load_reward_model(path, device)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str], texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = encode_pairs(
                self.tokenizer,
                prompts[start : start + self.batch_size],
                texts[start : start + self.batch_size],
                self.max_length,
                self.device,
            )
            scores.extend(self.model(ids, mask).tolist())
        return scores


def encode_pairs(
    tokenizer, prompts, texts, max_length: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + text (+ eos), cut from the left to `max_length`, right-padded."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = [(tokenizer(p + t)["input_ids"] + eos)[-max_length:] for p, t in zip(prompts, texts)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


# ---- data --------------------------------------------------------------------------------------
def procedural_pairs(cfg: Config) -> list[dict]:
    """Preference pairs from the built-in tasks: a correct, clear summary beats a worse one.

    The rejected side is one of: a wrong final answer, a hedge between two answers, an
    unhelpful refusal, or a rambling summary that never commits.
    """
    from r1lab.tasks.corpus import cold_start_examples

    rng = random.Random(cfg.seed)
    chosen = cold_start_examples(
        families=cfg.families,
        n=cfg.n_pairs,
        seed=cfg.seed,
        levels=cfg.levels,
        zh_fraction=cfg.zh_fraction,
    )
    pairs = []
    for ex in chosen:
        answer = str(ex["answer"])
        wrong = _wrong_answer(answer, rng)
        thought = ex["response"].rsplit("</think>", 1)[0] + "</think>\n"
        zh = ex.get("language") == "zh"
        kind = rng.choice(["wrong", "hedge", "refuse", "ramble"])
        if kind == "wrong":
            bad = ("答案是 " if zh else "The answer is ") + f"\\boxed{{{wrong}}}."
        elif kind == "hedge":
            bad = f"The answer is \\boxed{{{answer}}} or \\boxed{{{wrong}}}."
        elif kind == "refuse":
            bad = "我不知道。" if zh else "I am not sure, I cannot answer this."
        else:
            bad = "Hmm, it could be many things, numbers are hard, maybe check again later."
        pairs.append({"prompt": ex["prompt"], "chosen": ex["response"], "rejected": thought + bad})
    return pairs


def _wrong_answer(answer: str, rng: random.Random) -> str:
    try:
        return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    except ValueError:
        return answer + "0"


def load_pairs(cfg: Config) -> list[dict]:
    """Every pair with each side cut to the text the reward model judges (`cfg.judge`).

    The same cut as in scoring (`text_to_judge`), so the model is trained on the text it
    will score; a pair with a side that has nothing to judge is left out, as scoring would
    leave it unjudged.
    """
    pairs: list[dict] = []
    for source in cfg.data:
        if source == "procedural":
            pairs += procedural_pairs(cfg)
        elif Path(source).suffix in (".jsonl", ".json", ".parquet") or Path(source).exists():
            pairs += _checked_pairs(read_rows(Path(source)))
        else:
            pairs += _checked_pairs(read_hub_rows(source, needed_by="reward-model data"))
    judged = []
    for pair in pairs:
        chosen, rejected = (text_to_judge(pair["prompt"], pair[k], cfg.judge) for k in PAIR_SIDES)
        if chosen is not None and rejected is not None:
            judged.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
    if len(judged) < len(pairs):
        training.console.print(
            f"reward-model: left out {len(pairs) - len(judged)} pairs with no {cfg.judge} to judge"
        )
    if not judged:
        raise ValueError(f"reward-model: no preference pairs in {cfg.data}")
    return judged


def _checked_pairs(rows) -> list[dict]:
    """`{prompt, chosen, rejected}` rows; a bad row names the file, line and field."""
    pairs = []
    for where, row in rows:
        for key in ("prompt", *PAIR_SIDES):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: missing or non-text field {key!r}")
        pairs.append({k: row[k] for k in ("prompt", *PAIR_SIDES)})
    return pairs


def pair_accuracy(
    rm: RewardModel, tokenizer, pairs: list[dict], cfg: Config, device, autocast=None
) -> float:
    """The share of `pairs` whose chosen side scores higher; under torchrun each rank
    scores its share of every chunk of 128 pairs and the wins are summed."""
    rm.eval()
    wins = 0
    with torch.no_grad():
        for start in range(0, len(pairs), 128):
            chunk = pairs[start : start + 128]
            mine = distributed.shard_of(len(chunk))
            part = chunk[mine.start : mine.stop]
            with autocast or nullcontext():  # every rank runs a forward (FSDP gathers)
                margin = _pair_margin(rm, tokenizer, part or chunk[:1], cfg, device)
            wins += int((margin > 0).sum()) if part else 0
    rm.train()
    return distributed.all_reduce_sum(wins) / max(1, len(pairs))


def _pair_margin(rm, tokenizer, batch, cfg: Config, device) -> torch.Tensor:
    prompts = [p["prompt"] for p in batch] * 2
    texts = [p["chosen"] for p in batch] + [p["rejected"] for p in batch]
    ids, mask = encode_pairs(tokenizer, prompts, texts, cfg.max_length, device)
    scores = rm(ids, mask).float()
    return scores[: len(batch)] - scores[len(batch) :]


def train_step(rm, optimizer, tokenizer, batch: list[dict], cfg: Config, device, autocast) -> dict:
    """One optimizer step on a batch of pairs: loss -log sigmoid(margin), mean over pairs.

    Under torchrun every rank holds the whole batch and scores its contiguous share; its
    loss is summed over its pairs and divided by the batch's pair count (the global
    normaliser), times the world size since FSDP averages gradients over ranks, so the
    summed gradient is the one-process gradient. A rank whose share is empty (a batch
    smaller than the world) runs a forward on one pair with a zero loss, so every rank
    runs the same FSDP collectives. The numbers are summed over ranks.
    """
    n = len(batch)
    mine = distributed.shard_of(n)
    part = batch[mine.start : mine.stop]
    with autocast:
        margin = _pair_margin(rm, tokenizer, part or batch[:1], cfg, device)
    loss = -torch.nn.functional.logsigmoid(margin).sum() / n
    optimizer.zero_grad(set_to_none=True)
    (loss * (distributed.grad_scale() if part else 0.0)).backward()
    grad_norm = training.clip_grad(rm, cfg.grad_clip)
    optimizer.step()
    mine_sums = [loss.item(), float((margin > 0).sum()), margin.sum().item()] if part else [0.0] * 3
    loss_sum, wins, margins = distributed.all_reduce_sums(mine_sums)
    return {"loss": loss_sum, "accuracy": wins / n, "margin": margins / n, "grad_norm": grad_norm}


def pairs_fingerprint(pairs: list[dict]) -> str:
    """A hash of the judged pairs: a resume must train on the pairs it started with."""
    return hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:16]


# ---- the stage ---------------------------------------------------------------------------------
def run(cfg: Config, out_dir, resume: bool = True) -> dict:
    """Train the reward model into `out_dir/model`; returns the stage summary.

    Resumes from `out_dir/state` (written on one process or many) when `resume`; under
    torchrun rank 0 alone writes the run dir, the other ranks their checkpoint shards.
    """
    out = Path(out_dir)
    if resume and training.is_done(out, cfg.fingerprint()):
        training.console.print(f"[green]reward-model: {out} is already done")
        return json.loads((out / training.DONE_FILE).read_text())
    if not cfg.model:
        raise ValueError("reward-model: field 'model' is required (the decoder to start from)")
    training.set_seed(cfg.seed)
    training.set_cpu_threads()
    # torchrun: this rank's GPU by index ("cuda" alone loads safetensors onto cuda:0)
    device = distributed.local_device(resolve_device(cfg.device))
    autocast = training.autocast_for(device, resolve_dtype(cfg.dtype, device))
    record = open_checkpoint(STAGE, cfg, out, resume, RESUME_NEUTRAL)

    pairs = load_pairs(cfg)
    data_hash = pairs_fingerprint(pairs)
    random.Random(cfg.seed).shuffle(pairs)
    n_held = max(1, int(len(pairs) * cfg.heldout_fraction))
    heldout, train = pairs[:n_held], pairs[n_held:]

    folder = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(folder)
    rm = RewardModel(load_model(folder, dtype=torch.float32, device=device)).to(device)
    export = reward_model_export(rm.decoder.config, tokenizer, cfg.judge, stored_dtype(folder))
    if distributed.active():  # torchrun: shard before the optimizer sees the parameters
        distributed.check_agreement(cfg.fingerprint())
        distributed.shard_model(rm, layers=rm.decoder.model.layers)
    optimizer = training.make_optimizer(rm, cfg.lr, cfg.weight_decay)
    snapshot = TrainingSnapshot(model=rm, optimizer=optimizer)
    step, extra = 0, {}
    if record is not None:
        info = restore_checkpoint(out, snapshot)
        step, extra = info["step"], info["extra"]
        if extra.get("data_hash") != data_hash:
            raise RuntimeError(f"reward-model: the pairs differ from those {out} was trained on")
        training.console.print(f"reward-model: resuming {out} after step {step}")
    elif distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / training.DONE_FILE, out / "state"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    distributed.barrier()
    log: training.MetricsLog | distributed.NullLog = distributed.NullLog()
    if distributed.is_main():  # torchrun: rank 0 writes the run dir
        write_config(cfg, out / "config.yaml")
        log = training.MetricsLog(out / "metrics.jsonl", resume_step=step + 1 if record else None)

    accuracy_before = extra.get("accuracy_before")
    if accuracy_before is None:
        accuracy_before = pair_accuracy(rm, tokenizer, heldout, cfg, device, autocast)
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    clock = Clock(extra.get("train_s", 0.0))
    finished = bool(extra.get("finished", False))  # killed after the final checkpoint
    stop = extra.get("stopped_by")

    def checkpoint(final: bool = False) -> None:
        state = {
            "config": cfg.model_dump(mode="json"),
            "data_hash": data_hash,
            "accuracy_before": accuracy_before,
            "train_s": clock.elapsed(),
            "finished": final,
            "stopped_by": stop,
        }
        position = {"epoch": step // max(1, steps_per_epoch), "step": step}
        save_checkpoint(out, snapshot, rm, tokenizer, step, position, state, export=export)

    shuffled = -1  # the epochs whose shuffle of `train` is done (each shuffles the last)
    rm.train()
    with training.progress_bar("reward-model", total) as advance:
        advance(step)
        while not finished and step < total:
            epoch, k = divmod(step, steps_per_epoch)
            while shuffled < epoch:
                shuffled += 1
                random.Random(cfg.seed + shuffled).shuffle(train)
            batch = train[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            training.set_lr(optimizer, training.lr_at(step, total, cfg.lr, cfg.warmup_steps))
            numbers = train_step(rm, optimizer, tokenizer, batch, cfg, device, autocast)
            step += 1
            log.write({"step": step, **numbers})
            advance(info=f"loss {numbers['loss']:.3f} acc {numbers['accuracy']:.2f}")
            # torchrun: every rank stops by the furthest rank's clock, after the same step
            if (
                cfg.max_minutes
                and distributed.all_reduce_max(clock.elapsed()) > cfg.max_minutes * 60
            ):
                stop = "max_minutes"
                break
            if step % cfg.save_every == 0:
                checkpoint()
    stop = stop or "epochs"

    accuracy = pair_accuracy(rm, tokenizer, heldout, cfg, device, autocast)
    if not finished:
        checkpoint(final=True)
    summary = {
        "heldout_pair_accuracy": accuracy,
        "heldout_pair_accuracy_before": accuracy_before,
        "heldout_pairs": len(heldout),
        "train_pairs": len(train),
        "steps": step,
        "stopped_by": stop,
        "seconds": round(clock.elapsed(), 1),
        "judge": cfg.judge,
    }
    if distributed.is_main():
        atomic_write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
        training.console.print(
            f"reward-model: held-out pair accuracy {accuracy_before:.3f} -> {accuracy:.3f} "
            f"({len(heldout)} pairs)"
        )
        training.mark_done(out, cfg.fingerprint(), **summary)
    distributed.barrier()  # no rank moves on before DONE is there
    return summary
