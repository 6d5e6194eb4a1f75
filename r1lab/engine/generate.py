"""Batched sampling with a KV cache: prompts in, completions (ids, log-probs, why they stopped) out.

`sample` is the one entry point every stage uses. Inside it, prompts of different lengths
are left-padded and prefilled once; a prompt sampled `n` times is prefilled once and its
cache copied to its `n` rows (the GRPO group); finished rows leave the batch so the decode
loop ends when the last one stops. `sample_without_cache` recomputes the whole sequence
for every token: it is slow and kept as the reference the fast path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("n", self.n >= 1, ">= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"SamplingParams.{name}={getattr(self, name)!r}: must be {allowed}"
                )
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)


@dataclass
class Completion:
    """One sampled continuation of prompt number `prompt_index`.

    `token_ids` includes the stop token when one ended it; `text` is the decoded
    completion without the stop token (cut at a stop string when one matched);
    `logprobs[i]` is log p(token_ids[i]) under softmax(logits / temperature).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    extra: dict = field(default_factory=dict)


def _stop_ids(model, tokenizer, params: SamplingParams) -> set[int]:
    ids = set(params.stop_token_ids) | set(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _pick_tokens(
    logits: torch.Tensor, params: SamplingParams, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-prob for each row of `logits` (rows, vocab)."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logits = logits / params.temperature
    logprobs = torch.log_softmax(logits, -1)
    filtered = logits
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(filtered, params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens ranked above it already cover top_p.
        drop = probs.cumsum(-1) - probs > params.top_p
        drop = drop.scatter(-1, order, drop)
        filtered = filtered.masked_fill(drop, float("-inf"))
    tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


class _StopChecker:
    """Decides when a row is done: a stop token, a stop string, or the length budget."""

    def __init__(self, stop_ids: set[int], stop_strings: tuple[str, ...], tokenizer):
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the completions")
        self.stop_ids, self.stop_strings, self.tokenizer = stop_ids, stop_strings, tokenizer

    def __call__(self, token_ids: list[int]) -> bool:
        if token_ids[-1] in self.stop_ids:
            return True
        if self.stop_strings:
            text = self.tokenizer.decode(token_ids[-16:], skip_special_tokens=False)
            return any(s in text for s in self.stop_strings)
        return False

    def finish(self, prompt_index: int, ids: list[int], lps: list[float]) -> Completion:
        stopped = bool(ids) and (ids[-1] in self.stop_ids or self._has_stop_string(ids))
        reason = FINISH_STOP if stopped else FINISH_LENGTH
        text = None
        if self.tokenizer is not None:
            body = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            for s in self.stop_strings:
                if s in text:
                    text = text[: text.index(s)]
        return Completion(prompt_index, ids, lps, reason, text)

    def _has_stop_string(self, ids: list[int]) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[list[int]],
    params: SamplingParams | None = None,
    tokenizer=None,
    max_batch_size: int | None = None,
) -> list[Completion]:
    """Sample `params.n` completions for every prompt; results are grouped by prompt.

    `max_batch_size` bounds how many sequences decode together (memory); prompts are
    processed in chunks of `max_batch_size // n`. On CUDA the call goes to the engine in
    `fast_generate` (R1LAB_FAST_SAMPLER=0 keeps it here).
    """
    params = params or SamplingParams()
    if model.device.type == "cuda":
        from r1lab.engine import fast_generate

        if fast_generate.applicable(model, params):
            return fast_generate.fast_sample(model, prompt_ids, params, tokenizer, max_batch_size)
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample() needs at least one prompt, and every prompt needs a token")
    per_chunk = len(prompt_ids) if not max_batch_size else max(1, max_batch_size // params.n)
    generator = _make_generator(params, model.device)
    checker = _StopChecker(_stop_ids(model, tokenizer, params), params.stop_strings, tokenizer)
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    try:
        for start in range(0, len(prompt_ids), per_chunk):
            chunk = prompt_ids[start : start + per_chunk]
            out.extend(_sample_chunk(model, chunk, start, params, checker, generator))
    finally:
        model.train(was_training)
    return out


def _sample_chunk(model, prompts, offset, params, checker, generator) -> list[Completion]:
    pad_id = model.config.pad_token_id or 0
    ids, mask = _left_pad(prompts, pad_id, model.device)
    rows = len(prompts) * params.n
    cache = model.new_cache(len(prompts), ids.shape[1] + params.max_new_tokens)
    logits = model(ids, attention_mask=mask, cache=cache)[:, -1]
    cache.repeat_interleave(params.n)
    logits = logits.repeat_interleave(params.n, dim=0)

    tokens_out: list[list[int]] = [[] for _ in range(rows)]
    logprobs_out: list[list[float]] = [[] for _ in range(rows)]
    active = list(range(rows))  # original row of each batch row
    running = [True] * rows  # per batch row: still generating
    for step in range(params.max_new_tokens):
        tokens, lps = _pick_tokens(logits, params, generator)
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
            tokens = tokens[keep]
            active = [row for row, on in zip(active, running) if on]
            running = [True] * len(active)
        logits = model(tokens[:, None], cache=cache)[:, -1]

    return [
        checker.finish(offset + row // params.n, tokens_out[row], logprobs_out[row])
        for row in range(rows)
    ]


@torch.no_grad()
def sample_without_cache(
    model, prompt_ids: list[list[int]], params: SamplingParams, tokenizer=None
) -> list[Completion]:
    """The slow reference: one sequence at a time, the full forward recomputed per token."""
    generator = _make_generator(params, model.device)
    checker = _StopChecker(_stop_ids(model, tokenizer, params), params.stop_strings, tokenizer)
    out = []
    for index, prompt in enumerate(prompt_ids):
        for _ in range(params.n):
            seq = list(prompt)
            ids, lps = [], []
            for _step in range(params.max_new_tokens):
                logits = model(torch.tensor([seq], device=model.device))[:, -1]
                token, lp = _pick_tokens(logits, params, generator)
                ids.append(int(token))
                lps.append(float(lp))
                seq.append(int(token))
                if checker(ids):
                    break
            out.append(checker.finish(index, ids, lps))
    return out
