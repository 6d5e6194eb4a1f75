"""Per-token log-probabilities and entropies from a decoder: the one place this math lives.

The LM head is applied in chunks of positions so the full (tokens x vocab) fp32 logits of a
batch never exist at once: with a 150k vocabulary that tensor alone would dwarf the model.
"""

from __future__ import annotations

import torch


def gather_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[target] for every position; shapes (..., V) -> (...)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each next token: out[b, t] = log p(input_ids[b, t + 1] | prefix).

    Returns (logprobs (B, T-1), entropy (B, T-1) or None). Gradients flow through the
    log-probs; the entropy is computed without them (a diagnostic).
    """
    hidden = model.hidden_states(
        input_ids, attention_mask=attention_mask, position_ids=position_ids
    )
    hidden = hidden[:, :-1]
    targets = input_ids[:, 1:]
    b, t, d = hidden.shape
    flat_h, flat_t = hidden.reshape(b * t, d), targets.reshape(b * t)
    logps, ents = [], []
    for start in range(0, b * t, chunk_size):
        logits = model.lm_head(flat_h[start : start + chunk_size])
        logps.append(gather_logprobs(logits, flat_t[start : start + chunk_size], temperature))
        if with_entropy:
            with torch.no_grad():
                ents.append(entropy_from_logits(logits, temperature))
    logprobs = torch.cat(logps).view(b, t)
    entropy = torch.cat(ents).view(b, t) if with_entropy else None
    return logprobs, entropy
