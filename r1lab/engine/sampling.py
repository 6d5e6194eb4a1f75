"""What a sampling call is and what it returns, and the rules every sampler applies.

`SamplingParams` in, `Completion`s out; when a row stops (stop tokens, stop strings);
how prompts are left-padded; which tokens top-k / top-p leave; where the randomness of
a draw comes from. Both samplers (the reference in `generate`, the GPU engine behind
`fast_generate`) take these from here, so neither imports the other's internals.

Randomness is counter-based, not a generator stream. Every prompt carries a 63-bit key
(`sample_key`: by default (seed, prompt index), in GRPO (seed, step, round, question)),
every row the key of (prompt key, sample index), and the token at position t of a row is
drawn with the uniform `uniforms(row key, t)`, a hash of the two in int64 tensor ops. A
row's draws therefore do not depend on which other rows share its batch, how the
prompts are chunked, or how many processes split them; the hash is a pure tensor op, so
the engine computes it inside its CUDA graph without a host sync.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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


def stop_token_ids(model, tokenizer, params: SamplingParams) -> set[int]:
    """The tokens that end a row: the call's, the model's EOS ids and the tokenizer's EOS."""
    ids = set(params.stop_token_ids) | set(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one (rows, width) tensor, and the mask of real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def filter_logits(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits / temperature with the tokens outside top-k, then outside the top-p nucleus,
    set to -inf (fp32). The nucleus is that of the tempered distribution, so the caller
    divides by the temperature first."""
    filtered = scaled_logits.float()
    if top_k and top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens ranked above it already cover top_p.
        drop = probs.cumsum(-1) - probs > top_p
        filtered = filtered.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return filtered


# ---- counter-based randomness -------------------------------------------------------------
KEY_MASK = (1 << 63) - 1  # keys are non-negative int64
_M32 = 0xFFFFFFFF


def sample_key(*parts) -> int:
    """A 63-bit key from any parts (ints, strings): the same parts give the same key on
    every machine and in every process."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & KEY_MASK


def prompt_keys(params: SamplingParams, count: int, keys: Sequence[int] | None = None) -> list[int]:
    """The key of each of `count` prompts: `keys` when given, else (seed, prompt index) with
    `params.seed`, or a seed drawn from torch's global generator when that is None."""
    if keys is not None:
        if len(keys) != count:
            raise ValueError(f"{len(keys)} sampling keys for {count} prompts")
        return [int(k) & KEY_MASK for k in keys]
    seed = params.seed if params.seed is not None else int(torch.randint(2**31, (1,)))
    return [sample_key(seed, i) for i in range(count)]


def row_keys(keys: Sequence[int], n: int) -> list[int]:
    """The key of every row: sample j of prompt i is (key i, j); rows grouped by prompt."""
    return [sample_key(k, j) for k in keys for j in range(n)]


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x < 2^32 without leaving int64: the high half's product is cut
    to the 16 bits that survive the shift before it is shifted."""
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (high + (x & 0xFFFF) * c) & _M32


def _mix32(x):
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(keys: torch.Tensor, position) -> torch.Tensor:
    """One uniform in [0, 1) per row (fp32, 24 random bits) for the token at `position`
    (an int or an int64 tensor that broadcasts against `keys`): a hash of the row's key
    and the position, in int64 tensor ops (works in a CUDA graph, no host sync)."""
    h = _mix32((position & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (keys & _M32))
    h = _mix32(h ^ (keys >> 32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def draw_tokens(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample each row of softmax(scores) (rows, vocab; -inf = excluded) by inverting its
    CDF, in token-id order, at the row's uniform `u`: the token whose interval holds
    u * total. The same rule as the engine's kernel; never a token of probability 0."""
    probs = scores.float().softmax(-1)
    cum = probs.cumsum(-1)
    total = cum[:, -1:]
    target = torch.minimum(u[:, None] * total, total.nextafter(torch.zeros_like(total)))
    tokens = torch.searchsorted(cum, target, right=True).clamp_(max=probs.shape[-1] - 1)
    # a cumulative sum that rounds non-monotonically (parallel scans) could land on an
    # excluded token: take the most likely one instead (never seen; kept as a guard)
    ok = probs.gather(-1, tokens) > 0
    return torch.where(ok, tokens, probs.argmax(-1, keepdim=True))[:, 0]


def pick_tokens(
    logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-prob under softmax(logits / T) for each row of `logits`:
    the argmax at temperature 0, else a draw at `u` from the top-k / top-p filtered
    distribution."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logits = logits / params.temperature
    logprobs = torch.log_softmax(logits, -1)
    tokens = draw_tokens(filter_logits(logits, params.top_k, params.top_p), u)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


class StopChecker:
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
        stopped = bool(ids) and (ids[-1] in self.stop_ids or self.has_stop_string(ids))
        reason = FINISH_STOP if stopped else FINISH_LENGTH
        text = None
        if self.tokenizer is not None:
            body = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            for s in self.stop_strings:
                if s in text:
                    text = text[: text.index(s)]
        return Completion(prompt_index, ids, lps, reason, text)

    def has_stop_string(self, ids: list[int]) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)

    def stop_string_cut(self, ids: list[int]) -> int:
        """Length of the shortest prefix whose text holds a stop string (all of ids if none):
        where a sampler that checked every token would have stopped."""
        if not ids or not self.has_stop_string(ids):
            return len(ids)
        lo, hi = 1, len(ids)  # the prefix of length hi holds one; find the shortest
        while lo < hi:
            mid = (lo + hi) // 2
            if self.has_stop_string(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return hi
