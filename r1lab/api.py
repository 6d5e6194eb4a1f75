"""The public Python API: load a model and its tokenizer, sample from it, save it."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from r1lab.engine.generate import Completion, SamplingParams, sample
from r1lab.model.checkpoint import load_model, save_model
from r1lab.model.tokenizer import load_tokenizer
from r1lab.training import resolve_model_dir


def load(path: str | Path, dtype=None, device=None):
    """(model, tokenizer) from a Hugging Face folder, a hub id, or a stage run dir.

    `dtype`: a torch dtype or "float32" / "bfloat16" / "auto" (the checkpoint's own);
    `device`: "cpu", "cuda", ... (default cpu).
    """
    folder = resolve_model_dir(path)
    model = load_model(folder, dtype=dtype, device=device)
    tokenizer = load_tokenizer(folder) if Path(folder).exists() else None
    return model, tokenizer


def save(model, path: str | Path, tokenizer=None, dtype=None) -> None:
    """`model` (and `tokenizer`) as a Hugging Face folder that `load` and transformers read."""
    save_model(model, path, tokenizer=tokenizer, dtype=dtype)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in prompts]


def generate(model, tokenizer, prompts: str | list[str], **sampling) -> list[Completion]:
    """Sample completions for `prompts`; keyword arguments are SamplingParams fields.

    Returns one Completion per (prompt, sample), grouped by prompt, each with `text`,
    `token_ids`, `logprobs` and `finish_reason` ("stop" or "length").
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    max_batch_size = sampling.pop("max_batch_size", None)
    params = SamplingParams(**sampling)
    ids = encode_prompts(tokenizer, prompts)
    warn_over_context(ids, model.config.max_position_embeddings, params.max_new_tokens)
    return sample(model, ids, params, tokenizer, max_batch_size)


def sampling_options(settings: Any) -> dict[str, Any]:
    """How `settings` (a stage config, `r1lab generate`'s flags) says to sample: its values
    under SamplingParams' field names (temperature, top_p, max_new_tokens, seed, ...), as
    keyword options for SamplingParams or `generate`. `n` is left out: a stage config's `n`
    counts questions, not completions per prompt, so the caller gives it."""
    return {
        f.name: getattr(settings, f.name)
        for f in fields(SamplingParams)
        if f.name != "n" and hasattr(settings, f.name)
    }


def warn_over_context(prompt_ids: list[list[int]], context: int, max_new_tokens: int = 0) -> int:
    """Warn once (to stderr) when prompts plus `max_new_tokens` exceed the model's context,
    with how many and the limit; returns that count. The model still runs (positions past
    its context are extrapolated), but its output there means little."""
    over = [len(p) for p in prompt_ids if len(p) + max_new_tokens > context]
    if over:
        print(
            f"warning: {len(over)} of {len(prompt_ids)} prompts (longest {max(over)} tokens) "
            f"plus max_new_tokens={max_new_tokens} exceed the model's context of {context} "
            "tokens; the output past it is unreliable",
            file=sys.stderr,
        )
    return len(over)
