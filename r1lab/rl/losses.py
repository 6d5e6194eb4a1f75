"""The clipped policy-gradient loss of GRPO and its variants, as one function with options.

GRPO, Dr. GRPO, DAPO and GSPO differ only in where the ratio is taken, how wide the clip
is and how token losses are summed into one number; each is a combination of the options
of `policy_loss` rather than a separate loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1lab.rl.advantages import _check_option

RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - cur.

    Unbiased for the KL when the tokens are sampled from pi_theta, always >= 0 and low in
    variance; this is the KL term of the GRPO objective (pi_ref/pi - log(pi_ref/pi) - 1).
    """
    return _k3(ref_logprobs - logprobs)


def _k3(d: torch.Tensor) -> torch.Tensor:
    return torch.exp(d) - d - 1


def loss_normalizer(
    mask: torch.Tensor | Sequence[torch.Tensor],
    aggregation: str = "seq-mean-token-mean",
    norm_length: float | None = None,
) -> float:
    """The denominator of `policy_loss` for a whole batch, for micro-batched training.

    Every aggregation is (sum over sequences of a per-sequence quantity) / D, with D a
    property of the whole batch:

    - "seq-mean-token-mean": D = number of sequences (each sequence's own token count is
      local to it, so it stays inside the per-sequence term);
    - "token-mean": D = number of unmasked tokens in the batch;
    - "seq-mean-token-sum-norm": D = number of sequences * norm_length.

    Compute D once on the full batch and pass it as `policy_loss(..., normalizer=D)` for
    every micro-batch: the micro-batch losses then sum to the full-batch loss, so
    accumulating their gradients gives the full-batch gradient whatever the split. `mask`
    may be the (N, T) mask of the batch or a list of micro-batch masks (padded to
    different lengths). D is at least 1, so a batch with no tokens gives a zero loss.

    With data parallelism that averages gradients over W ranks, sum D over the ranks and
    multiply the loss by W to get the gradient of the global batch.
    """
    _check_option("aggregation", aggregation, AGGREGATIONS)
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    for m in masks:
        if m.dim() != 2:
            raise ValueError(f"mask must be 2-D (N, T), got shape {tuple(m.shape)}")
    num_sequences = sum(m.shape[0] for m in masks)
    if aggregation == "seq-mean-token-mean":
        denominator = float(num_sequences)
    elif aggregation == "token-mean":
        denominator = float(sum(int(m.bool().sum()) for m in masks))
    else:
        if norm_length is None or norm_length <= 0:
            raise ValueError(
                "aggregation 'seq-mean-token-sum-norm' needs norm_length > 0 (the constant "
                f"token count each sequence is divided by, e.g. the max generation length); got {norm_length!r}"
            )
        denominator = float(num_sequences * norm_length)
    return max(denominator, 1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "seq-mean-token-mean",
    norm_length: float | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Minus the clipped surrogate objective (plus the KL penalty), and diagnostics.

    Shapes: `logprobs`, `old_logprobs`, `ref_logprobs`, `mask` are (N, T) over completion
    tokens (mask: 1/True = a real token); `advantages` is (N,), one per sequence. Only
    `logprobs` needs a gradient. Masked positions may hold anything finite or not; they
    never reach the loss.

    Per token: min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) - beta * k3, where
    `eps_high` defaults to `eps_low` (set it higher for DAPO's clip-higher).

    - `ratio_level="token"`: rho = exp(logprobs - old_logprobs) per token (GRPO, PPO).
    - `ratio_level="sequence"`: one ratio per sequence, rho_i = exp(masked mean over t of
      (logprobs - old_logprobs)), shared by its tokens and clipped as a whole (GSPO). The
      gradient flows through rho_i, i.e. rho_i * mean_t grad log pi per sequence.

    The KL term (`beta` > 0, which needs `ref_logprobs`) is in the loss, not the reward,
    as GRPO has it. The loss is -(sum of per-sequence terms) / D:

    - "seq-mean-token-mean": the mean over each sequence's tokens, then over sequences
      (GRPO: 1/G sum_i 1/|o_i| sum_t);
    - "token-mean": the sum over all tokens / the number of tokens in the batch (DAPO);
    - "seq-mean-token-sum-norm": the sum over all tokens / (N * norm_length) (Dr. GRPO,
      norm_length a constant such as the max generation length).

    `normalizer` replaces D, the whole-batch denominator from `loss_normalizer`: pass it
    to every micro-batch so that the micro-batch losses sum to the full-batch loss.
    Without it D is computed from this call's `mask`, so one call on the whole batch
    needs no normalizer (and `norm_length` is only needed when there is no normalizer).

    Stats (detached 0-dim tensors, no host sync), masked means over this call's tokens:
    "clip_ratio/low_mean" (rho < 1 - eps_low with A < 0: clipping removed the gradient),
    "clip_ratio/high_mean" (rho > 1 + eps_high with A > 0), "clip_ratio/region_mean"
    (either), "kl" (mean k3, whenever `ref_logprobs` is given, else 0), "ratio_mean".
    """
    _check_option("ratio_level", ratio_level, RATIO_LEVELS)
    _check_option("aggregation", aggregation, AGGREGATIONS)
    if eps_high is None:
        eps_high = eps_low
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low} and {eps_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 adds a KL penalty to the reference policy: pass ref_logprobs")
    _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs)

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    lp = logprobs.to(dtype)
    m = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    adv = advantages.to(dtype)[:, None]
    # Padding may hold -inf or garbage: zero the log-ratio there before exp.
    log_ratio = torch.where(m, lp - old_logprobs.to(dtype), zero)
    if ratio_level == "sequence":
        lengths = m.sum(dim=1, keepdim=True).clamp(min=1)
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / lengths).expand_as(lp)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)

    kl = None
    if ref_logprobs is not None:
        kl = _k3(torch.where(m, ref_logprobs.to(dtype) - lp, zero))
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, zero)

    if normalizer is None:
        normalizer = loss_normalizer(m, aggregation, norm_length)
    elif not isinstance(normalizer, torch.Tensor) and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0 (see loss_normalizer), got {normalizer}")
    if aggregation == "seq-mean-token-mean":
        per_seq = per_token.sum(dim=1) / m.sum(dim=1).clamp(min=1)
        loss = per_seq.sum() / normalizer
    else:
        loss = per_token.sum() / normalizer

    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        stats = {
            "clip_ratio/low_mean": _masked_mean(low, m),
            "clip_ratio/high_mean": _masked_mean(high, m),
            "clip_ratio/region_mean": _masked_mean(low | high, m),
            "kl": _masked_mean(kl, m) if kl is not None else zero.clone(),
            "ratio_mean": _masked_mean(ratio, m),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = values.to(torch.float32)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _check_shapes(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D (N, T), got shape {tuple(logprobs.shape)}")
    named = {"old_logprobs": old_logprobs, "mask": mask}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, t in named.items():
        if t.shape != logprobs.shape:
            raise ValueError(
                f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}"
            )
    if advantages.shape != (logprobs.shape[0],):
        raise ValueError(
            f"advantages must have shape (N,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}"
        )
