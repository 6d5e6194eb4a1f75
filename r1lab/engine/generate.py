"""Batched sampling with a KV cache: prompts in, completions (ids, log-probs, why they stopped) out.

`sample` is the one entry point every stage uses. Inside it, prompts of different lengths
are left-padded and prefilled once; a prompt sampled `n` times is prefilled once and its
cache copied to its `n` rows (the GRPO group); finished rows leave the batch so the decode
loop ends when the last one stops. `sample_without_cache` recomputes the whole sequence
for every token: it is slow and kept as the reference the fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1lab.engine import fast_generate
from r1lab.engine.sampling import (
    Completion,
    SamplingParams,
    StopChecker,
    left_pad,
    pick_tokens,
    prompt_keys,
    row_keys,
    stop_token_ids,
    uniforms,
)

__all__ = [
    "Completion",
    "SamplingParams",
    "sample",
    "sample_without_cache",
]


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[list[int]],
    params: SamplingParams | None = None,
    tokenizer=None,
    max_batch_size: int | None = None,
    keys: Sequence[int] | None = None,
) -> list[Completion]:
    """Sample `params.n` completions for every prompt; results are grouped by prompt.

    `max_batch_size` bounds how many sequences decode together (memory); prompts are
    processed in chunks of `max_batch_size // n`. `keys` (one per prompt, see
    `sampling.sample_key`) name what is drawn: a prompt's completions depend on its key
    and the model only, not on the other prompts of the call. Without them the keys are
    (params.seed, prompt index). On CUDA the call goes to the engine in `fast_generate`
    (R1LAB_FAST_SAMPLER=0 keeps it here).
    """
    params = params or SamplingParams()
    if model.device.type == "cuda" and fast_generate.applicable(model, params, tokenizer):
        return fast_generate.fast_sample(
            model, prompt_ids, params, tokenizer, max_batch_size, keys=keys
        )
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample() needs at least one prompt, and every prompt needs a token")
    per_chunk = len(prompt_ids) if not max_batch_size else max(1, max_batch_size // params.n)
    rkeys = row_keys(prompt_keys(params, len(prompt_ids), keys), params.n)
    checker = StopChecker(stop_token_ids(model, tokenizer, params), params.stop_strings, tokenizer)
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    try:
        for start in range(0, len(prompt_ids), per_chunk):
            chunk = prompt_ids[start : start + per_chunk]
            chunk_keys = rkeys[start * params.n : (start + len(chunk)) * params.n]
            out.extend(_sample_chunk(model, chunk, start, params, checker, chunk_keys))
    finally:
        model.train(was_training)
    return out


def _sample_chunk(model, prompts, offset, params, checker, keys) -> list[Completion]:
    pad_id = model.config.pad_token_id or 0
    ids, mask = left_pad(prompts, pad_id, model.device)
    rows = len(prompts) * params.n
    cache = model.new_cache(len(prompts), ids.shape[1] + params.max_new_tokens)
    logits = model(ids, attention_mask=mask, cache=cache)[:, -1]
    cache.repeat_interleave(params.n)
    logits = logits.repeat_interleave(params.n, dim=0)
    keys = torch.tensor(keys, dtype=torch.long, device=model.device)  # of the batch's rows

    tokens_out: list[list[int]] = [[] for _ in range(rows)]
    logprobs_out: list[list[float]] = [[] for _ in range(rows)]
    active = list(range(rows))  # original row of each batch row
    running = [True] * rows  # per batch row: still generating
    for step in range(params.max_new_tokens):
        tokens, lps = pick_tokens(logits, params, uniforms(keys, step))
        tokens_list, lps_list = tokens.tolist(), lps.tolist()
        for j, row in enumerate(active):
            if running[j]:
                tokens_out[row].append(tokens_list[j])
                logprobs_out[row].append(lps_list[j])
                running[j] = not checker(tokens_out[row])
        live = sum(running)
        if step == params.max_new_tokens - 1 or live == 0:
            break
        # Finished rows ride along (their tokens are ignored) until a quarter of the batch
        # has finished: compacting copies the whole cache, so doing it each time a row
        # stops costs more than the wasted compute.
        if live <= 0.75 * len(active):
            keep = torch.tensor(running, device=model.device)
            cache.select(keep.nonzero()[:, 0])
            tokens, keys = tokens[keep], keys[keep]
            active = [row for row, on in zip(active, running) if on]
            running = [True] * len(active)
        logits = model(tokens[:, None], cache=cache)[:, -1]

    return [
        checker.finish(offset + row // params.n, tokens_out[row], logprobs_out[row])
        for row in range(rows)
    ]


@torch.no_grad()
def sample_without_cache(
    model,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    tokenizer=None,
    keys: Sequence[int] | None = None,
) -> list[Completion]:
    """The slow reference: one sequence at a time, the full forward recomputed per token."""
    rkeys = row_keys(prompt_keys(params, len(prompt_ids), keys), params.n)
    checker = StopChecker(stop_token_ids(model, tokenizer, params), params.stop_strings, tokenizer)
    out = []
    for index, prompt in enumerate(prompt_ids):
        for j in range(params.n):
            key = torch.tensor([rkeys[index * params.n + j]], device=model.device)
            seq = list(prompt)
            ids, lps = [], []
            for step in range(params.max_new_tokens):
                logits = model(torch.tensor([seq], device=model.device))[:, -1]
                token, lp = pick_tokens(logits, params, uniforms(key, step))
                ids.append(int(token))
                lps.append(float(lp))
                seq.append(int(token))
                if checker(ids):
                    break
            out.append(checker.finish(index, ids, lps))
    return out
