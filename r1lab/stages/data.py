"""Data, batches, loss and checkpoints shared by the supervised stages (pretrain and sft).

The two stages differ only in where their text comes from and which tokens are targets;
the layout of a batch, the masked loss, the schedule budget and the resume checkpoint are
the same, so they live here once.

Batches are packed rows: whole documents (or prompt + response examples) placed side by
side in rows of `seq_len` tokens, positions restarting at 0 for each one, so attention never
crosses from one document into another (the model's packed-sequence path). A per-token loss
mask says which tokens are targets: every token for pretraining, only the response for SFT.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from r1lab.config import ConfigError, StageConfig
from r1lab.engine.logprobs import token_logprobs
from r1lab.model.checkpoint import (
    TRAINER_STATE_NAME,
    latest_checkpoint,
    load_training_state,
    save_model,
    save_training_state,
)
from r1lab.rows import DataError  # one error type for every bad dataset file
from r1lab.training import clip_grad, resolve_model_dir

BUILTIN_SOURCES = ("cold-start", "non-reasoning")
REQUIRED_FIELDS = ("prompt", "response")


class ProceduralConfig(StageConfig):
    """Settings of the stages that draw on the built-in procedural families."""

    families: list[str] = Field(default_factory=lambda: ["chain_sum"], min_length=1)
    levels: list[int] = Field(default_factory=lambda: [1], min_length=1)
    zh_fraction: float = Field(default=0.3, ge=0, le=1)  # share of questions posed in Chinese

    @field_validator("families", "levels", mode="before")
    @classmethod
    def _one_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) else value

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: list[str]) -> list[str]:
        from r1lab.tasks.procedural import FAMILY_NAMES

        unknown = [f for f in value if f not in FAMILY_NAMES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; known: {', '.join(FAMILY_NAMES)}")
        return value

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, value: list[int]) -> list[int]:
        from r1lab.tasks.procedural import LEVELS

        if any(level not in LEVELS for level in value):
            raise ValueError(f"levels must be among {list(LEVELS)}, got {value}")
        return value


# ---- prompt/response sources -------------------------------------------------------------
def check_row(row: Any, where: str) -> dict:
    """One prompt/response example, or a DataError that says where and what is wrong."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with 'prompt' and 'response', got {type(row).__name__}"
        )
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], str):
            raise DataError(
                f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}"
            )
    if not row["response"].strip():
        raise DataError(f"{where}: field 'response' is empty")
    return {"prompt": row["prompt"], "response": row["response"]}


def read_jsonl(path: str | Path) -> list[dict]:
    """Prompt/response examples from a JSON-lines file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder; pass the .jsonl file inside it)" if path.is_dir() else ""
        raise FileNotFoundError(f"SFT data file not found: {path}{hint}")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
                rows.append(check_row(obj, f"{path}, line {lineno}"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def read_hf_dataset(spec: str) -> list[dict]:
    """Prompt/response examples from a Hugging Face dataset `org/name` or `org/name:split`."""
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"SFT data {spec!r} looks like a Hugging Face dataset id; reading it needs the "
            "`datasets` package (pip install 'r1lab[hub]')"
        ) from err
    ds = datasets.load_dataset(name, split=split)
    missing = [c for c in REQUIRED_FIELDS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"dataset {name} (split {split}): missing column(s) {', '.join(missing)}; "
            f"it has: {', '.join(ds.column_names)}"
        )
    rows = [
        check_row({"prompt": p, "response": r}, f"dataset {name} (split {split}), row {i}")
        for i, (p, r) in enumerate(zip(ds["prompt"], ds["response"]))
    ]
    if not rows:
        raise DataError(f"dataset {name} (split {split}): no examples")
    return rows


def builtin_examples(
    name: str,
    tokenizer,
    *,
    families: Sequence[str],
    levels: Sequence[int],
    n: int,
    zh_fraction: float,
    seed: int,
) -> list[dict]:
    """Generated procedural examples; prompts use the tokenizer's own chat format."""
    from r1lab.tasks import procedural

    make = {
        "cold-start": procedural.cold_start_examples,
        "non-reasoning": procedural.non_reasoning_examples,
    }[name]
    rows = make(
        list(families), n, seed, levels=list(levels), zh_fraction=zh_fraction, tokenizer=tokenizer
    )
    return [{"prompt": r["prompt"], "response": r["response"]} for r in rows]


def load_source(spec: str, tokenizer, **builtin_options) -> list[dict]:
    """A built-in generator name, a .jsonl path, or a Hugging Face dataset id."""
    if spec in BUILTIN_SOURCES:
        return builtin_examples(spec, tokenizer, **builtin_options)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") or path.exists():
        return read_jsonl(path)
    if "/" in spec:
        return read_hf_dataset(spec)
    raise DataError(
        f"unknown SFT data source {spec!r}: expected a .jsonl file, a Hugging Face dataset id "
        f"(org/name or org/name:split) or a built-in: {', '.join(BUILTIN_SOURCES)}"
    )


def mix_sources(
    sources: list[list[dict]], weights: Sequence[float] | None, seed: int
) -> list[dict]:
    """One shuffled list of examples from several sources.

    Without weights every example is used once. With weights the mixture keeps the total
    size, and source i makes up `w_i / sum(w)` of it: a small source is repeated, a large
    one subsampled (each without repeats before it cycles).
    """
    rng = random.Random(f"{seed}:mix")
    if weights is None:
        mixed = [row for rows in sources for row in rows]
    else:
        total, norm = sum(len(rows) for rows in sources), sum(weights)
        mixed = []
        for rows, weight in zip(sources, weights):
            k = round(total * weight / norm)
            order = list(range(len(rows)))
            rng.shuffle(order)
            mixed += [rows[order[i % len(rows)]] for i in range(k)]
    rng.shuffle(mixed)
    return mixed


# ---- tokens, masks and packed rows -----------------------------------------------------------
def encode_prompts_batched(tokenizer, prompts: list[str]) -> list[list[int]]:
    """`r1lab.api.encode_prompts` (the sampler's encoding: default special tokens) in one
    batched call, which is many times faster for tens of thousands of prompts."""
    if not prompts:
        return []
    return tokenizer(prompts)["input_ids"]


def tokenize_examples(
    rows: list[dict], tokenizer, seq_len: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids and loss masks of prompt + response + EOS; the prompt is masked out.

    Prompts are encoded as the sampler encodes them, so training sees the same ids the model
    is later prompted with. An example longer than `seq_len` is cut at the end (counted and
    returned); one whose prompt alone fills the row has nothing to learn and is dropped.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; SFT needs one to teach the model to stop")
    prompts = encode_prompts_batched(tokenizer, [r["prompt"] for r in rows])
    responses = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    docs, masks, cut = [], [], 0
    for prompt, response in zip(prompts, responses):
        if not response or response[-1] != eos:
            response = [*response, eos]
        ids, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
        if len(ids) > seq_len:
            cut += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        if sum(mask[1:]) == 0:
            continue
        docs.append(ids)
        masks.append(mask)
    return docs, masks, cut


def _fill_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Group document indices into rows of at most `seq_len` tokens (best fit, longest first).

    A document longer than a row gets rows of its own. Packing whole documents keeps every
    example with its beginning: a piece cut from the middle of one would be trained on
    without its question.
    """
    rows: list[list[int]] = []
    open_rows: dict[int, list[int]] = {}  # free space -> rows with that much space left
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        size = lengths[i]
        if size >= seq_len:
            rows.append([i])
            continue
        room = next((r for r in range(size, seq_len) if open_rows.get(r)), None)
        if room is None:
            rows.append([i])
            row, left = len(rows) - 1, seq_len - size
        else:
            row, left = open_rows[room].pop(), room - size
            rows[row].append(i)
        if left:
            open_rows.setdefault(left, []).append(row)
    return rows


def _pieces(
    docs: list[list[int]], masks: list[list[int]], seq_len: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Documents longer than a row cut into row-sized pieces, each then a document of its own."""
    out_docs, out_masks = [], []
    for doc, mask in zip(docs, masks):
        if len(doc) <= seq_len:
            out_docs.append(doc)
            out_masks.append(mask)
            continue
        for start in range(0, len(doc), seq_len):
            out_docs.append(doc[start : start + seq_len])
            out_masks.append(mask[start : start + seq_len])
    return out_docs, out_masks


def pack_rows(
    docs: list[list[int]], masks: list[list[int]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, loss_mask), each (rows, seq_len), whole documents per row.

    The layout of `training.pack_sequences` (positions restart at 0 for every document, so
    attention stays inside it; a document's first token is no target), with rows planned by
    `_fill_rows` so that no document is split, and the end of a row padded (loss mask 0).
    Built as flat lists and converted once, so millions of tokens pack in about a second.
    """
    if not docs:
        raise ValueError("nothing to pack: no documents")
    docs, masks = _pieces(docs, masks, seq_len)
    ids: list[int] = []
    pos: list[int] = []
    targets: list[int] = []
    for row in _fill_rows([len(d) for d in docs], seq_len):
        used = 0
        for i in row:
            doc = docs[i]
            ids += doc
            pos += range(len(doc))
            targets.append(0)
            targets += masks[i][1:]
            used += len(doc)
        pad, last = seq_len - used, len(docs[row[-1]])
        ids += [pad_id] * pad
        pos += range(last, last + pad)  # continues the row's last document, never a new one
        targets += [0] * pad
    return tuple(_as_rows(values, seq_len) for values in (ids, pos, targets))


def _as_rows(values: list[int], seq_len: int) -> torch.Tensor:
    """A flat int list as a (rows, seq_len) tensor (numpy reads a long list ~8x faster)."""
    flat = np.fromiter(values, dtype=np.int64, count=len(values))
    return torch.from_numpy(flat).view(-1, seq_len)


def rows_fingerprint(*tensors: torch.Tensor) -> str:
    """Short hash of the packed data, so a resume can tell the data has not changed."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


class RowSampler:
    """Batches of row indices; a fresh seeded order every epoch.

    Its position is two integers (epoch, offset), saved with the checkpoint, so a resumed
    run draws exactly the batches the interrupted one would have drawn.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(self.n_rows, generator=gen))
        return self._order[1]

    def next_batch(self) -> torch.Tensor:
        if self.offset >= self.n_rows:
            self.epoch, self.offset = self.epoch + 1, 0
        batch = self._epoch_order()[self.offset : self.offset + self.batch_size]
        self.offset += len(batch)
        return batch


# ---- loss and optimisation step ----------------------------------------------------------
def autocast_for(device: str, dtype: torch.dtype):
    """bf16 autocast over fp32 weights when a low-precision dtype is asked for, else nothing."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def masked_nll(
    model, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None
) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens, divided by `normalizer`.

    `mask[b, t] = 1` marks token t as a target (predicted from the tokens before it in its
    own document). The normalizer defaults to the number of targets (a mean); a caller that
    splits a batch into micro-batches passes the whole batch's count, so the summed
    micro-batch losses equal the loss of the whole batch.
    """
    logprobs, _ = token_logprobs(model, ids, position_ids=pos)
    targets = mask[:, 1:].to(logprobs.dtype)
    if normalizer is None:
        normalizer = max(1.0, float(targets.sum()))
    return -(logprobs * targets).sum() / normalizer


def train_step(
    model,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    micro_batch_size: int | None,
    grad_clip: float,
    autocast,
) -> tuple[float, float]:
    """One optimizer step on a batch of packed rows; returns (mean target loss, grad norm)."""
    ids, pos, mask = batch
    n_targets = max(1.0, float(mask[:, 1:].sum()))
    size = micro_batch_size or len(ids)
    total = 0.0
    for start in range(0, len(ids), size):
        part = slice(start, start + size)
        with autocast:
            loss = masked_nll(model, ids[part], pos[part], mask[part], normalizer=n_targets)
        loss.backward()
        total += float(loss.detach())
    grad_norm = clip_grad(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def eval_loss(
    model, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int, device, autocast
) -> float:
    """Mean target loss over held-out rows (the model is left in training mode)."""
    ids, pos, mask = rows
    model.eval()
    total, count = 0.0, 0.0
    try:
        for start in range(0, len(ids), batch_size):
            part = [t[start : start + batch_size].to(device) for t in (ids, pos, mask)]
            with autocast:
                total += float(masked_nll(model, *part, normalizer=1.0))
            count += float(part[2][:, 1:].sum())
    finally:
        model.train()
    return total / max(count, 1.0)


# ---- budget and schedule -------------------------------------------------------------------
@dataclass
class Budget:
    """When training stops, and how far along its schedule it is.

    Steps and wall-clock time are both budgets; whichever runs out first ends the run. The
    learning-rate schedule follows the same progress, so a run cut short by the clock on a
    slow machine still finishes its cosine decay instead of stopping at a high rate.
    """

    max_steps: int
    max_seconds: float | None = None

    def progress(self, step: int, elapsed: float) -> float:
        done = step / self.max_steps
        if self.max_seconds is not None:
            done = max(done, elapsed / max(self.max_seconds, 1e-9))
        return min(done, 1.0)

    def stop_reason(self, step: int, elapsed: float) -> str | None:
        if step >= self.max_steps:
            return "max_steps"
        if self.max_seconds is not None and elapsed >= self.max_seconds:
            return "max_minutes"
        return None


class Clock:
    """Training time that survives a resume (time spent before the restart is added)."""

    def __init__(self, before: float = 0.0):
        self.before, self.start = before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start


# ---- checkpoints ----------------------------------------------------------------------------
class Snapshot:
    """Model weights and optimizer as one object for `save_training_state`'s optimizer slot.

    state/ then holds a whole checkpoint on its own: a kill between writing state/ and
    model/ cannot pair the weights of one step with the optimizer of another.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def save_checkpoint(
    out: Path,
    model,
    optimizer,
    tokenizer,
    step: int,
    data_position: dict,
    extra: dict,
    export_dtype=None,
) -> None:
    """model/ (the HF folder users load, tokenizer included), then state/ (for a resume).

    model/ goes first so that whenever state/ exists, model/ holds the run's tokenizer.
    """
    save_model(model, out / "model", tokenizer=tokenizer, dtype=export_dtype)
    save_training_state(
        out / "state",
        optimizer=Snapshot(model, optimizer),
        step=step,
        data_position=data_position,
        extra=extra,
    )


def saved_state(out: Path) -> dict | None:
    """The trainer record of a resumable checkpoint in `out`, without loading tensors."""
    folder = latest_checkpoint(out)
    if folder is None:
        return None
    return json.loads((folder / TRAINER_STATE_NAME).read_text())


def restore_checkpoint(out: Path, model, optimizer) -> dict:
    """Load weights, optimizer and RNG from `out/state`; return step, data_position, extra."""
    return load_training_state(latest_checkpoint(out), optimizer=Snapshot(model, optimizer))


def check_resumable(stage: str, out: Path, record: dict, settings: dict, neutral: set[str]) -> None:
    """Refuse to continue a checkpoint made with other settings (naming them)."""
    saved = record.get("extra", {}).get("config", {})
    changed = sorted(
        k
        for k in set(saved) | set(settings)
        if k not in neutral and saved.get(k) != settings.get(k)
    )
    if changed:
        raise ConfigError(
            f"{stage}: {out} holds an unfinished run with other settings ({', '.join(changed)}); "
            "use a new --out, or --no-resume to start over there"
        )


def find_model(path: str) -> Path:
    """A local model folder for a folder, a stage run dir or a Hugging Face Hub id."""
    from r1lab.model.checkpoint import resolve_model_dir as resolve_checkpoint

    return resolve_checkpoint(str(resolve_model_dir(path)))
