"""Pretraining: the base model of the R1 recipe, trained from scratch on procedural problems.

The recipe starts from a base model that already knows something of its tasks, imperfectly
(R1-Zero's RL sharpens what the base can sometimes do). For the tiny pipeline that base is
trained here in a few minutes on a laptop CPU: a byte-level BPE tokenizer and a small
decoder, on a corpus of worked problems in the forms later stages prompt with (R1-Zero
conversations, plain text, some flawed or self-checking solutions; see
`r1lab.tasks.corpus.pretrain_documents`). With a real checkpoint, `init_from` takes it
as the base instead and nothing is trained.

Reads top to bottom: config -> corpus and tokenizer -> model -> loop -> save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from r1lab import distributed, training
from r1lab.config import resolve_device, resolve_dtype, write_config
from r1lab.model.checkpoint import resolve_model_dir
from r1lab.model.config import SIZES, ModelConfig, config_for_size
from r1lab.model.tokenizer import R1_ZERO_TEMPLATE, load_tokenizer, train_tokenizer
from r1lab.model.transformer import Transformer
from r1lab.stages import supervised
from r1lab.stages.data import ProceduralConfig
from r1lab.stages.packing import encode_prompts_batched, pack_rows
from r1lab.tasks.corpus import pretrain_documents

STAGE = "pretrain"
# Settings that may change between an interrupted run and its resume (r1lab.rundir).
RESUME_NEUTRAL = supervised.SUPERVISED_RESUME_NEUTRAL
R1_ZERO_HEAD, R1_ZERO_TAIL = R1_ZERO_TEMPLATE.split("{prompt}")
CORPUS_OPTIONS = (
    "r1_zero_fraction",
    "brief_think_fraction",
    "no_reasoning_fraction",
    "flawed_fraction",
    "check_fraction",
    "opener_fraction",
    "chat_fraction",
    "mixed_language_fraction",
    "scratchpad_fraction",
    "template_fraction",
)


class Config(ProceduralConfig):
    """`r1lab pretrain`. The defaults are the tiny CPU run: 1000 steps, at most 5 minutes."""

    # A model folder, stage run dir or Hub id to take as the base instead of training.
    init_from: str | None = None

    # corpus (r1lab.tasks.procedural)
    family_weights: list[float] | None = None  # share of documents per family (default equal)
    n_documents: int = Field(default=40_000, ge=2)
    val_documents: int = Field(default=500, ge=1)  # held out from the corpus for val_loss
    vocab_size: int = Field(default=1024, ge=266)  # upper bound; a small corpus gives fewer
    tokenizer_documents: int = Field(default=5000, ge=1)  # BPE trained on this many documents
    # Shares of the document forms, passed to pretrain_documents (CORPUS_OPTIONS).
    corpus_options: dict[str, float] = Field(default_factory=dict)

    # model (r1lab.model.config.SIZES), with ModelConfig fields to change, e.g. num_hidden_layers
    size: str = "tiny"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    # Std of the normal weight init. 0.05 rather than the usual 0.02: the tiny model then
    # learns to copy the question's numbers (the step its accuracy hinges on) in ~2M tokens
    # instead of ~5M (docs/supervised.md).
    init_std: float = Field(default=0.05, gt=0)

    # optimisation
    seq_len: int = Field(default=128, ge=8)  # tokens per packed row
    batch_size: int = Field(default=16, ge=1)  # rows per optimizer step (small: more updates)
    micro_batch_size: int | None = Field(default=None, ge=1)  # rows per forward (memory)
    lr: float = Field(default=2e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine decays to lr * this
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 = no clipping
    # ~2M tokens: the tiny model's accuracy jumps once it learns to copy the question's
    # numbers, at ~2M tokens with these settings (docs/supervised.md). The clock caps it
    # on a slow or busy machine, with the schedule still decayed by the end.
    max_steps: int = Field(default=1000, ge=1)
    max_minutes: float | None = Field(default=5.0, gt=0)  # wall clock of the whole stage

    # logging, checkpoints, divergence (stop after this many NaN/inf steps in a row)
    max_nan_steps: int = Field(default=3, ge=1)
    log_every: int = Field(default=50, ge=1)
    eval_every: int = Field(default=200, ge=1)
    save_every: int = Field(default=200, ge=1)

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        if value not in SIZES:
            raise ValueError(f"unknown size {value!r}; known sizes: {', '.join(SIZES)}")
        return value

    @field_validator("corpus_options")
    @classmethod
    def _known_corpus_options(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(CORPUS_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown corpus options {unknown}; known: {', '.join(CORPUS_OPTIONS)}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.family_weights is not None and (
            len(self.family_weights) != len(self.families) or min(self.family_weights) <= 0
        ):
            raise ValueError("family_weights needs one positive weight per entry of families")
        if self.val_documents >= self.n_documents:
            raise ValueError("val_documents must be smaller than n_documents")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(
                f"model_overrides: unknown ModelConfig fields {unknown}; known: {', '.join(sorted(known))}"
            )
        context = self.model_overrides.get(
            "max_position_embeddings", SIZES[self.size]["max_position_embeddings"]
        )
        if self.seq_len > context:
            raise ValueError(
                f"seq_len {self.seq_len} exceeds the {self.size} model's context {context}"
            )
        return self


# ---- corpus, tokenizer, model ----------------------------------------------------------------
def build_corpus(cfg: Config) -> list[str]:
    """The documents, families mixed by weight in a seeded order."""
    weights = cfg.family_weights or [1.0] * len(cfg.families)
    docs: list[str] = []
    for i, (family, weight) in enumerate(zip(cfg.families, weights)):
        n = round(cfg.n_documents * weight / sum(weights))
        docs += pretrain_documents(
            family,
            n,
            cfg.seed + 1000 * i,
            levels=cfg.levels,
            zh_fraction=cfg.zh_fraction,
            **cfg.corpus_options,
        )
    random.Random(f"{cfg.seed}:corpus").shuffle(docs)
    return docs


def split_prompt(doc: str) -> tuple[str, str]:
    """(prompt, completion) of an R1-Zero conversation; other documents are all completion.

    The tokenizer merges across spaces, so "Assistant: " followed by the reasoning encodes
    to other tokens than the prompt "...Assistant:" does alone. The later stages encode the
    prompt alone and sample the rest, so the corpus is encoded the same way: the model then
    trains on exactly the tokens it is prompted with.
    """
    if doc.startswith(R1_ZERO_HEAD):
        end = doc.find(R1_ZERO_TAIL, len(R1_ZERO_HEAD))
        if end >= 0:
            cut = end + len(R1_ZERO_TAIL)
            return doc[:cut], doc[cut:]
    return "", doc


def encode_documents(docs: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document (prompt and completion encoded apart), ending with EOS."""
    prompts, completions = zip(*(split_prompt(d) for d in docs))
    prompt_ids = encode_prompts_batched(tokenizer, list(prompts))
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [p + c + [eos] for p, c in zip(prompt_ids, completion_ids)]


def encode_corpus(docs: list[str], tokenizer, cfg: Config, pad_id: int):
    """(train rows, val rows): each document ends with EOS so the model learns to stop."""
    ids = encode_documents(docs, tokenizer)
    masks = [[1] * len(d) for d in ids]
    split = len(ids) - cfg.val_documents
    train = pack_rows(ids[:split], masks[:split], cfg.seq_len, pad_id)
    val = pack_rows(ids[split:], masks[split:], cfg.seq_len, pad_id)
    return train, val


def build_model(cfg: Config, tokenizer) -> Transformer:
    model_cfg = config_for_size(
        cfg.size,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg.model_overrides,
    )
    model = Transformer(model_cfg)
    model.reset_parameters(std=cfg.init_std)
    return model


def take_base(cfg: Config, out: Path) -> dict:
    """The `init_from` path: link the given checkpoint in as this stage's model/.

    A link, not a copy: a real base model is gigabytes, and later stages only read it.
    Where links are not allowed, the folder is copied.
    """
    folder = resolve_model_dir(cfg.init_from).resolve()
    model_cfg = ModelConfig.from_file(folder / "config.json")
    load_tokenizer(folder)  # fail here, not three stages later, if it has none
    target = out / "model"
    if distributed.is_main():  # torchrun: rank 0 writes the run dir
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
        _link(folder, target)
    summary = {
        "stage": STAGE,
        "init_from": cfg.init_from,
        "model": str(target),
        "source": str(folder),
        "parameters": model_cfg.num_parameters(),
    }
    training.console.print(
        f"pretrain: base model {cfg.init_from} -> {target} ({summary['parameters']:,} parameters)"
    )
    if distributed.is_main():
        training.mark_done(out, cfg.fingerprint(), **summary)
    distributed.barrier()  # no rank moves on before DONE is there
    return summary


def _link(folder: Path, target: Path) -> None:
    """`target` becomes a link to `folder` (a copy where links are not allowed)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    tmp = target.parent / f".model.link-{os.getpid()}"
    try:
        tmp.symlink_to(folder, target_is_directory=True)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        shutil.copytree(folder, target)


# ---- the stage ---------------------------------------------------------------------------------
def run(cfg: Config, out_dir: str | Path, resume: bool = True) -> dict:
    """Train (or take) the base model into `out_dir/model`; returns the stage summary."""
    out = Path(out_dir)
    if resume and training.is_done(out, cfg.fingerprint()):
        training.console.print(f"pretrain: {out} is done; reusing it")
        return json.loads((out / training.DONE_FILE).read_text())
    if cfg.init_from:
        return take_base(cfg, out)

    started = time.perf_counter()
    training.set_cpu_threads()
    training.set_seed(cfg.seed)
    device = distributed.local_device(resolve_device(cfg.device))  # torchrun: this rank's GPU
    dtype = resolve_dtype(cfg.dtype, device)
    record = supervised.open_checkpoint(STAGE, cfg, out, resume, RESUME_NEUTRAL)

    # corpus and tokenizer (a resumed run keeps the tokenizer it saved; under torchrun
    # rank 0 trains it and the other ranks receive it, so every rank has the same one)
    docs = build_corpus(cfg)
    if record is not None:
        tokenizer = load_tokenizer(out / "model")
    else:
        trained = None
        if distributed.is_main():
            trained = train_tokenizer(docs[: cfg.tokenizer_documents], cfg.vocab_size)
        tokenizer = distributed.all_gather_objects(trained)[0]
    train_rows, val_rows = encode_corpus(docs, tokenizer, cfg, tokenizer.pad_token_id)

    model = build_model(cfg, tokenizer).to(device)
    n_params = model.num_parameters()
    job = supervised.SupervisedJob(
        stage=STAGE,
        cfg=cfg,
        out=out,
        model=model,
        tokenizer=tokenizer,
        train_rows=train_rows,
        val_rows=val_rows,
        total_steps=cfg.max_steps,
        record=record,
        device=device,
        dtype=dtype,
        started=started,
        describe=f"{n_params:,} parameters ({cfg.size}), vocabulary {len(tokenizer)}, "
        f"{len(docs):,} documents",
    )
    numbers = supervised.train(job)
    summary = {
        "stage": STAGE,
        "model": str(out / "model"),
        **numbers,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
    }
    stop = numbers["stopped_by"]
    why = "time budget (max_minutes)" if stop == "max_minutes" else "max_steps"
    training.console.print(
        f"pretrain: stopped at step {summary['steps']} by {why}; val loss "
        f"{summary['initial_val_loss']:.3f} -> {summary['val_loss']:.3f}, "
        f"{summary['tokens_per_s']:.0f} tok/s, {summary['train_minutes']:.1f} min of training"
    )
    if distributed.is_main():  # torchrun: rank 0 writes the run dir
        training.mark_done(out, cfg.fingerprint(), **summary)
    distributed.barrier()
    return summary
