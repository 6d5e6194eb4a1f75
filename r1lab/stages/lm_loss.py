"""The supervised objective: masked next-token loss, one optimizer step, held-out loss."""

from __future__ import annotations

import torch

from r1lab.engine.logprobs import token_logprobs
from r1lab.training import clip_grad


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
