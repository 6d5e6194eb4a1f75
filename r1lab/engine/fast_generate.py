"""The GPU fast path of `sample()`: when it applies, and the call itself on the decode engine.

`sample()` (in `generate`) asks `applicable` and hands CUDA calls here; the work is done by
a `DecodeEngine` (`decode_engine`: static KV cache, one CUDA graph per decode step) through
the fused operations of `decode_ops` (Triton kernels of `decode_kernels`, or the same in
torch). One engine is kept per model between calls, rebuilt only when a call needs more
rows or a longer cache. Whenever the fast path declines, one line says why (`fallbacks`).

The same step runs with plain torch ops and no graph where Triton is missing (and on the
CPU, to check the logic); `sample()` only dispatches here on CUDA.
"""

from __future__ import annotations

import os
import weakref

import torch

from r1lab.engine.decode_engine import DecodeEngine
from r1lab.engine.decode_ops import HAS_TRITON, MAX_STOP_IDS
from r1lab.engine.fallbacks import declined
from r1lab.engine.sampling import (
    Completion,
    SamplingParams,
    StopChecker,
    left_pad,
    prompt_keys,
    row_keys,
    stop_token_ids,
)

PATH = "fast decode"  # the name declines are logged under
HEAD_DIMS = (32, 64, 128, 256)  # head sizes the attention kernel is built for
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAST_STATS: dict = {}

__all__ = [
    "DecodeEngine",
    "applicable",
    "enabled",
    "fast_sample",
    "get_engine",
    "last_stats",
    "release",
    "why_not",
]


def enabled() -> bool:
    """The fast path is on unless R1LAB_FAST_SAMPLER=0 (to force the reference sampler)."""
    return os.environ.get("R1LAB_FAST_SAMPLER", "1") != "0"


def why_not(model, params: SamplingParams, tokenizer=None) -> str | None:
    """Why the engine cannot take this call, or None when it can."""
    if not enabled():
        return "R1LAB_FAST_SAMPLER=0"
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}, not CUDA"
    if not HAS_TRITON:
        return "Triton is not installed"
    if model.config.head_dim not in HEAD_DIMS:
        return f"head_dim {model.config.head_dim} is not one of {HEAD_DIMS}"
    n_stop = len(stop_token_ids(model, tokenizer, params))
    if n_stop > MAX_STOP_IDS:
        return f"{n_stop} stop tokens, more than the engine's {MAX_STOP_IDS}"
    return None


def applicable(model, params: SamplingParams, tokenizer=None) -> bool:
    """Whether `sample()` should hand this call to the engine; logs why not (once per reason)."""
    reason = why_not(model, params, tokenizer)
    if reason is not None:
        declined(PATH, f"{reason}; sampling with the reference sampler")
    return reason is None


def last_stats() -> dict:
    """Timings of the most recent fast call: prefill and decode milliseconds, steps run."""
    return dict(_LAST_STATS)


def release(model) -> None:
    """Free the engine (weights copy, KV cache, graphs) kept for `model` between calls."""
    _ENGINES.pop(model, None)


def engine_of(model) -> DecodeEngine | None:
    """The engine kept for `model`, if any (to inspect which backend it runs)."""
    return _ENGINES.get(model)


def get_engine(model, rows: int, max_len: int, **kwargs) -> DecodeEngine:
    """The engine kept for `model`, rebuilt only when the call needs more rows or length."""
    eng = _ENGINES.get(model)
    dtype = kwargs.get("dtype")
    if (
        eng is None
        or eng.rows < rows
        or eng.max_len < max_len
        or (dtype is not None and eng.dtype != dtype)
    ):
        _ENGINES.pop(model, None)
        eng = None
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        eng = DecodeEngine(model, rows, -(-max_len // 64) * 64, **kwargs)
        _ENGINES[model] = eng
    return eng


@torch.no_grad()
def fast_sample(
    model,
    prompt_ids: list[list[int]],
    params: SamplingParams | None = None,
    tokenizer=None,
    max_batch_size: int | None = None,
    keys=None,
    **engine_kwargs,
) -> list[Completion]:
    """`sample()` on the engine: same arguments, same results (up to floating-point rounding:
    the same keys give the same uniforms, and both invert the CDF in token-id order).

    Stop strings are honoured after decoding: a row that produced one is cut at the first
    token where its text contains it, exactly where the reference sampler would have
    stopped; only stop tokens end a row early on the GPU.
    """
    params = params or SamplingParams()
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample() needs at least one prompt, and every prompt needs a token")
    per_chunk = len(prompt_ids) if not max_batch_size else max(1, max_batch_size // params.n)
    rkeys = row_keys(prompt_keys(params, len(prompt_ids), keys), params.n)
    stop_ids = stop_token_ids(model, tokenizer, params)
    checker = StopChecker(stop_ids, params.stop_strings, tokenizer)
    width = max(len(p) for p in prompt_ids)
    rows = min(len(prompt_ids), per_chunk) * params.n
    engine = get_engine(model, rows, width + params.max_new_tokens, **engine_kwargs)
    engine.load_weights(model)
    out: list[Completion] = []
    for start in range(0, len(prompt_ids), per_chunk):
        chunk = prompt_ids[start : start + per_chunk]
        ids, mask = left_pad(chunk, engine.pad_id, model.device)
        chunk_keys = rkeys[start * params.n : (start + len(chunk)) * params.n]
        tokens, logprobs = engine.generate(ids, mask, params, stop_ids, chunk_keys)
        _LAST_STATS.clear()
        _LAST_STATS.update(engine.last_stats)
        for row, (t, lp) in enumerate(zip(tokens, logprobs)):
            if params.stop_strings:
                cut = checker.stop_string_cut(t)
                t, lp = t[:cut], lp[:cut]
            out.append(checker.finish(start + row // params.n, t, lp))
    return out
