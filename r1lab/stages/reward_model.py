"""`r1lab reward-model`: a Bradley-Terry reward model on preference pairs.

R1's last RL stage adds reward models for general data: helpfulness judged on the final
summary only (the text after `</think>`), harmlessness on the whole response. This stage
trains such a model: the decoder with a scalar head on the last token, loss
-log sigmoid(r_chosen - r_rejected), and reports held-out pair accuracy.

Data: jsonl files of `{prompt, chosen, rejected}`, a Hugging Face dataset id with those
columns, or "procedural": pairs made from the built-in tasks, where a clear, correct
summary is preferred over a wrong, hedging or unhelpful one.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from r1lab import distributed, training
from r1lab.config import ConfigError, resolve_device, write_config
from r1lab.model.checkpoint import atomic_write_text, load_model, resolve_model_dir, save_model
from r1lab.model.tokenizer import load_tokenizer
from r1lab.rewards.reward_model import text_to_judge
from r1lab.rows import DataError, read_hub_rows, read_rows
from r1lab.stages.data import ProceduralConfig

HEAD_FILE = "reward_head.safetensors"
PAIR_SIDES = ("chosen", "rejected")
HEAD_INFO = "reward_head.json"


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
        return self.score(hidden[torch.arange(len(last)), last].float()).squeeze(-1)


def save_reward_model(rm: RewardModel, path: str | Path, tokenizer, judge: str) -> None:
    """The decoder as a Hugging Face folder plus the head beside it (loadable on its own)."""
    save_model(rm.decoder, path, tokenizer=tokenizer)
    path = Path(path)
    head = {"score.weight": rm.score.weight.detach().float().cpu().contiguous()}
    tmp = path / f".{HEAD_FILE}.tmp"
    save_file(head, str(tmp))
    tmp.replace(path / HEAD_FILE)
    atomic_write_text(path / HEAD_INFO, json.dumps({"judge": judge}) + "\n")


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


def pair_accuracy(rm: RewardModel, tokenizer, pairs: list[dict], cfg: Config, device) -> float:
    rm.eval()
    wins = 0
    with torch.no_grad():
        for start in range(0, len(pairs), 128):
            batch = pairs[start : start + 128]
            wins += int((_pair_margin(rm, tokenizer, batch, cfg, device) > 0).sum())
    rm.train()
    return wins / max(1, len(pairs))


def _pair_margin(rm, tokenizer, batch, cfg: Config, device) -> torch.Tensor:
    prompts = [p["prompt"] for p in batch] * 2
    texts = [p["chosen"] for p in batch] + [p["rejected"] for p in batch]
    ids, mask = encode_pairs(tokenizer, prompts, texts, cfg.max_length, device)
    scores = rm(ids, mask)
    return scores[: len(batch)] - scores[len(batch) :]


# ---- the stage ---------------------------------------------------------------------------------
def run(cfg: Config, out_dir, resume: bool = True) -> dict:
    out = Path(out_dir)
    if resume and training.is_done(out, cfg.fingerprint()):
        training.console.print(f"[green]reward-model: {out} is already done")
        return json.loads((out / "DONE").read_text())
    if not cfg.model:
        raise ValueError("reward-model: field 'model' is required (the decoder to start from)")
    if distributed.active():  # every rank would train the whole model and write the run dir
        raise ConfigError("reward-model runs in one process only for now: drop --nproc")
    training.set_seed(cfg.seed)
    training.set_cpu_threads()
    device = resolve_device(cfg.device)

    pairs = load_pairs(cfg)
    random.Random(cfg.seed).shuffle(pairs)
    n_held = max(1, int(len(pairs) * cfg.heldout_fraction))
    heldout, train = pairs[:n_held], pairs[n_held:]

    folder = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(folder)
    rm = RewardModel(load_model(folder, device=device)).to(device)
    optimizer = training.make_optimizer(rm, cfg.lr, cfg.weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out / "config.yaml")
    log = training.MetricsLog(out / "metrics.jsonl")

    accuracy_before = pair_accuracy(rm, tokenizer, heldout, cfg, device)
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    started = time.time()
    step = 0
    rm.train()
    with training.progress_bar("reward-model", total) as advance:
        for epoch in range(cfg.epochs):
            random.Random(cfg.seed + epoch).shuffle(train)
            for start in range(0, len(train), cfg.batch_size):
                training.set_lr(optimizer, training.lr_at(step, total, cfg.lr, cfg.warmup_steps))
                margin = _pair_margin(
                    rm, tokenizer, train[start : start + cfg.batch_size], cfg, device
                )
                loss = -torch.nn.functional.logsigmoid(margin).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = training.clip_grad(rm, cfg.grad_clip)
                optimizer.step()
                step += 1
                record = {
                    "step": step,
                    "loss": loss.item(),
                    "accuracy": float((margin > 0).float().mean()),
                    "margin": margin.mean().item(),
                    "grad_norm": grad_norm,
                }
                log.write(record)
                advance(info=f"loss {record['loss']:.3f} acc {record['accuracy']:.2f}")
                if cfg.max_minutes and time.time() - started > cfg.max_minutes * 60:
                    break

    accuracy = pair_accuracy(rm, tokenizer, heldout, cfg, device)
    save_reward_model(rm, out / "model", tokenizer, cfg.judge)
    summary = {
        "heldout_pair_accuracy": accuracy,
        "heldout_pair_accuracy_before": accuracy_before,
        "heldout_pairs": len(heldout),
        "train_pairs": len(train),
        "steps": step,
        "seconds": round(time.time() - started, 1),
        "judge": cfg.judge,
    }
    atomic_write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    training.console.print(
        f"reward-model: held-out pair accuracy {accuracy_before:.3f} -> {accuracy:.3f} "
        f"({len(heldout)} pairs)"
    )
    training.mark_done(out, cfg.fingerprint(), **summary)
    return summary
