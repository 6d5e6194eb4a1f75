"""What a sampling call is and what it returns, and the rules every sampler applies.

`SamplingParams` in, `Completion`s out; when a row stops (stop tokens, stop strings);
how prompts are left-padded; which tokens top-k / top-p leave. Both samplers (the
reference in `generate`, the GPU engine behind `fast_generate`) take these from here, so
neither imports the other's internals.
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
