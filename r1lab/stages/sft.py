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
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from r1lab import distributed
from r1lab.config import resolve_device, resolve_dtype
from r1lab.model.checkpoint import atomic_dir, load_model, resolve_model_dir
from r1lab.model.config import ModelConfig
from r1lab.model.lora import LoraSettings, apply_lora, write_adapter
from r1lab.model.tokenizer import check_template, load_tokenizer, render_messages, render_prompt
from r1lab.stages import supervised
from r1lab.stages.data import ProceduralConfig, load_source, mix_sources
from r1lab.stages.packing import RowSampler, pack_rows, tokenize_examples
from r1lab.training import (
    DONE_FILE,
    console,
    is_done,
    mark_done,
    set_cpu_threads,
    set_seed,
)

STAGE = "sft"
RESUME_NEUTRAL = supervised.SUPERVISED_RESUME_NEUTRAL  # may change on a resume (r1lab.rundir)


class Config(ProceduralConfig):
    """`r1lab sft`. The defaults are the tiny CPU cold start (about a minute on 2 cores)."""

    model: str  # the starting model: a model folder, a stage run dir or a Hub id

    # data: each source is a built-in generator, a .jsonl with prompt/response or messages
    # rows, or a dataset id
    data: list[str] = Field(default_factory=lambda: ["cold-start"], min_length=1)
    data_weights: list[float] | None = None  # share of each source in the mixture
    n_examples: int = Field(default=2000, ge=1)  # per built-in source
    val_examples: int = Field(default=100, ge=0)  # held out from the mixture for val_loss
    # prompts: prompt/response rows are rendered with `template` (plain = as written; use the
    # template eval will use, so training and evaluation prompts match); messages rows with
    # the tokenizer's chat template. system_prompt / instruction as in `r1lab eval`.
    template: str = "plain"  # plain | r1-zero | r1-chat | chat | r1-distill | a .yaml file
    system_prompt: str | None = None  # system turn (chat) or preamble (plain, r1-zero)
    instruction: str | None = None  # appended to every question after a newline

    # optimisation
    seq_len: int = Field(default=256, ge=8)
    batch_size: int = Field(default=16, ge=1)  # rows per optimizer step
    micro_batch_size: int | None = Field(default=None, ge=1)  # rows per forward (memory)
    epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # cap on optimizer steps
    max_minutes: float | None = Field(default=None, gt=0)  # wall clock of the whole stage
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine to a tenth (R1 recipe)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, ge=0)
    gradient_checkpointing: bool = False
    # LoRA: {r, alpha, targets, dropout}; None trains every weight. model/ is saved merged,
    # adapter/ holds the adapters in PEFT's format
    lora: LoraSettings | None = None

    # logging, checkpoints, divergence (stop after this many NaN/inf steps in a row)
    max_nan_steps: int = Field(default=3, ge=1)
    log_every: int = Field(default=10, ge=1)
    eval_every: int = Field(default=50, ge=1)
    save_every: int = Field(default=100, ge=1)

    @field_validator("data", mode="before")
    @classmethod
    def _data_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) else value

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        return check_template(value)

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
    return render_examples(mix_sources(sources, cfg.data_weights, cfg.seed), tokenizer, cfg)


def render_examples(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """Prompt/response examples as trained on: prompt rows through the template, and every
    assistant turn of a messages row as one example (prompt: the conversation before it in
    the chat template, ending where the assistant writes; response: the turn). So the loss
    falls on assistant turns only, each once, with the earlier turns as context."""
    out = []
    for row in rows:
        if "messages" not in row:
            prompt = render_prompt(
                cfg.template,
                row["prompt"],
                tokenizer,
                system=cfg.system_prompt,
                instruction=cfg.instruction,
            )
            out.append({"prompt": prompt, "response": row["response"]})
            continue
        messages = row["messages"]
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        for i, turn in enumerate(messages):
            if turn["role"] == "assistant" and turn["content"].strip():
                prompt = render_messages(messages[:i], tokenizer, add_generation_prompt=True)
                out.append({"prompt": prompt, "response": turn["content"]})
    return out


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

    started = time.perf_counter()
    set_cpu_threads()
    set_seed(cfg.seed)
    # torchrun: this rank's GPU by index ("cuda" alone loads safetensors onto cuda:0)
    device = distributed.local_device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    record = supervised.open_checkpoint(STAGE, cfg, out, resume, RESUME_NEUTRAL)

    # data first: a bad source fails before anything is written
    source = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(source)
    examples = load_examples(cfg, tokenizer)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    train_rows, val_rows, stats = build_rows(cfg, examples, tokenizer, pad_id)

    # model (fp32 weights; bf16 autocast on GPU)
    model = load_model(source, dtype=torch.float32, device=device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.lora is not None:
        adapted = apply_lora(model, cfg.lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        console.print(f"sft: LoRA r={cfg.lora.r} on {len(adapted)} layers, {trainable:,} trainable")
    steps_per_epoch = RowSampler(len(train_rows[0]), cfg.batch_size, cfg.seed).steps_per_epoch
    epochs_steps = cfg.epochs * steps_per_epoch
    total_steps = min(epochs_steps, cfg.max_steps) if cfg.max_steps else epochs_steps
    job = supervised.SupervisedJob(
        stage=STAGE,
        cfg=cfg,
        out=out,
        model=model,
        tokenizer=tokenizer,
        train_rows=train_rows,
        val_rows=val_rows,
        total_steps=total_steps,
        record=record,
        device=device,
        dtype=dtype,
        started=started,
        export_dtype=stored_dtype(source),
        describe=f"{source} ({model.num_parameters():,} parameters) on {', '.join(cfg.data)}: "
        f"{stats['examples']} examples ({stats['truncated']} cut at {cfg.seq_len} tokens, "
        f"{stats['dropped']} dropped), {cfg.epochs} epochs",
    )
    numbers = supervised.train(job)
    if cfg.lora is not None and distributed.is_main():
        with atomic_dir(out / "adapter") as folder:
            write_adapter(model, folder, base_model=cfg.model)
    if numbers["stopped_by"] == "max_steps" and total_steps == epochs_steps:
        numbers["stopped_by"] = "epochs"
    summary = {
        "stage": STAGE,
        "model": str(out / "model"),
        "base": str(source),
        "data": list(cfg.data),
        **numbers,
        **stats,
    }
    initial, final = summary["initial_val_loss"], summary["val_loss"]
    before = f"{initial:.3f} -> " if initial is not None else ""
    after = f"{final:.3f}" if final is not None else "n/a"
    console.print(
        f"sft: {summary['steps']} steps ({summary['stopped_by']}); val loss {before}{after}, "
        f"{summary['tokens_per_s']:.0f} tok/s, {summary['train_minutes']:.1f} min of training"
    )
    if distributed.is_main():  # torchrun: rank 0 writes the run dir
        mark_done(out, cfg.fingerprint(), **summary)
    distributed.barrier()  # no rank moves on before DONE is there
    return summary
