"""The GRPO update on one rollout: completion log-probs, the clipped loss, micro-batched gradients.

`r1lab grpo` and `benchmarks/grpo_step.py` both call `update_on_rollout`, so the benchmark
times the stage's own update. Everything the update needs arrives as explicit arguments:
the sequences (`TrainBatch`) and the handful of settings of `UpdateSettings`.

A mini-batch is cut into micro-batches of `micro_batch_size` sequences whose losses share
the mini-batch's normaliser, so the gradient does not depend on the micro-batch size. A
micro-batch is either laid end to end without padding (`packed`, the fast path of
r1lab.engine.fast_train) or left/right padded (the reference the tests hold it to); the
packed path never builds the padded tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from r1lab import distributed
from r1lab.engine import activation_memory, fast_train
from r1lab.engine.fallbacks import declined
from r1lab.engine.logprobs import token_logprobs
from r1lab.rl import group_advantages, loss_normalizer, policy_loss, truncation_mask
from r1lab.training import clip_grad


@dataclass(frozen=True)
class UpdateSettings:
    """What the update computes (the objective) and how (batching, dtype, kernels)."""

    temperature: float = 1.0  # the rollout's: the ratio compares the sampled distribution
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float | None = None
    ratio_level: str = "token"
    aggregation: str = "seq-mean-token-mean"
    norm_length: float | None = None  # the constant of seq-mean-token-sum-norm
    mu: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 0  # sequences per forward; 0 = the whole mini-batch
    grad_clip: float = 1.0
    packed: bool = True
    compute_dtype: torch.dtype = torch.float32  # forwards run under autocast below fp32
    pad_id: int = 0  # the padded path's filler
    lm_head_chunk: int = 1024  # LM-head rows per chunk on the packed path
    attention: str = "auto"  # packed path: "auto" | "varlen" | "sdpa"
    # packed path, on CUDA, when differentiating: recompute every layer's activations in the
    # backward (True), none (False), the first n (an int), or as many as this GPU's free
    # memory needs ("auto": `plan_activations` picks n before the update)
    checkpoint_layers: bool | int | str = True
    compile_layers: bool | None = None  # packed path: None = on CUDA


@dataclass
class TrainBatch:
    """The sequences of one rollout as the update sees them."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: torch.Tensor  # (N,)
    counted: list[bool]  # False: the completion's tokens are left out of the loss
    sampler_logprobs: list[list[float]]

    def __len__(self) -> int:
        return len(self.completion_ids)


def train_batch(
    groups, *, group_size: int, adv_scale: str, adv_baseline: str, mask_truncated: bool
) -> TrainBatch:
    """Flatten the rollout's groups to sequences with their group-relative advantages."""
    rewards = [r for g in groups for r in g.rewards]
    advantages = group_advantages(rewards, group_size, scale=adv_scale, baseline=adv_baseline)
    completions = [c for g in groups for c in g.completions]
    return TrainBatch(
        prompt_ids=[g.prompt_ids for g in groups for _ in g.completions],
        completion_ids=[c.token_ids for c in completions],
        advantages=advantages,
        counted=[not (mask_truncated and c.finish_reason == "length") for c in completions],
        sampler_logprobs=[c.logprobs for c in completions],
    )


def phase(name: str):
    """A labelled range of the update (`grpo/<name>`) that a torch profiler reports with the
    device time of its kernels (benchmarks/grpo_step.py --profile); nearly free otherwise."""
    return torch.profiler.record_function(f"grpo/{name}")


# ---- one micro-batch ----------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """Sequences `indices` of a batch, laid out for one forward by the configured path."""

    indices: list[int]
    mask: torch.Tensor  # (n, width) bool: completion tokens that count in the loss
    advantages: torch.Tensor  # (n,)
    train_tokens: int  # prompt + completion tokens the forward runs over
    counted_tokens: int  # tokens in the loss (the mask's count, known without a device sync)
    pack: fast_train.PackedBatch | None = None  # packed path
    padded: dict[str, Any] | None = None  # padded path: input_ids, attention_mask, prompt_width


def micro_batch(
    batch: TrainBatch, indices: list[int], settings: UpdateSettings, device
) -> MicroBatch:
    """The loss mask and advantages of `indices`, plus the inputs of the configured path."""
    width = max(max(len(batch.completion_ids[i]) for i in indices), 1)
    mask = torch.zeros((len(indices), width), dtype=torch.bool)
    for row, i in enumerate(indices):
        mask[row, : len(batch.completion_ids[i])] = True
    mask = truncation_mask(torch.tensor([not batch.counted[i] for i in indices]), mask)
    tokens = sum(len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in indices)
    # copies that do not wait for the device (a pageable one syncs the stream)
    mb = MicroBatch(
        indices,
        fast_train.host_to_device(mask, device),
        fast_train.host_to_device(batch.advantages[indices], device),
        tokens,
        int(mask.sum()),
    )
    if settings.packed:
        mb.pack = fast_train.pack_rollouts(
            [batch.prompt_ids[i] for i in indices],
            [batch.completion_ids[i] for i in indices],
            max_tokens=2**62,  # one pack: the micro-batch is the unit of memory here
            device=device,
        )[0]
    else:
        mb.padded = _padded_inputs(batch, indices, settings.pad_id, device)
    return mb


def _padded_inputs(batch: TrainBatch, indices: list[int], pad_id: int, device) -> dict[str, Any]:
    """Sequences laid out as [left-padded prompt | right-padded completion].

    Every completion then starts at the same column P, so the completion log-probs of the
    whole micro-batch are one slice of the model's output.
    """
    p_width = max(len(batch.prompt_ids[i]) for i in indices)
    c_width = max(max(len(batch.completion_ids[i]) for i in indices), 1)
    ids = torch.full((len(indices), p_width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(indices), p_width + c_width), dtype=torch.long)
    for row, i in enumerate(indices):
        p, c = batch.prompt_ids[i], batch.completion_ids[i]
        ids[row, p_width - len(p) : p_width] = torch.tensor(p, dtype=torch.long)
        ids[row, p_width : p_width + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[row, p_width - len(p) : p_width + len(c)] = 1
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "prompt_width": p_width}


def completion_logprobs(
    model, mb: MicroBatch, settings: UpdateSettings, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the completion tokens of `mb`, (n, width), in fp32.

    Taken under softmax(logits / temperature), the distribution the rollout sampled from,
    so that the importance ratio compares the same quantity. Both paths give the same
    values; the packed one spends no compute on padding (a rollout's completions differ in
    length by several times). On CUDA the packed path compiles and checkpoints the decoder
    layers and uses varlen attention (see fast_train).
    """
    width = mb.mask.shape[1]
    if mb.pack is not None:
        checkpoint = settings.checkpoint_layers
        if model.device.type != "cuda" or not torch.is_grad_enabled():
            checkpoint = False
        elif checkpoint == "auto":  # not planned (a caller outside update_on_rollout): safe
            checkpoint = True
        out = fast_train.packed_logprobs(
            model,
            mb.pack,
            settings.temperature,
            chunk_size=settings.lm_head_chunk,
            attention=settings.attention,
            checkpoint=checkpoint,
            amp=settings.compute_dtype,
            compile=settings.compile_layers,
            with_entropy=with_entropy,
        )
        lp, ent = out if with_entropy else (out, None)

        def rows(values: torch.Tensor) -> torch.Tensor:
            r = fast_train.to_rows(values, mb.pack)
            return torch.nn.functional.pad(r, (0, width - r.shape[1])) if r.shape[1] < width else r

        return rows(lp), (rows(ent) if ent is not None else None)
    inputs = mb.padded
    with fast_train.autocast(model, settings.compute_dtype):
        lp, ent = token_logprobs(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            temperature=settings.temperature,
            with_entropy=with_entropy,
        )
    start = inputs["prompt_width"] - 1
    return lp[:, start : start + width], (
        ent[:, start : start + width] if ent is not None else None
    )


# ---- a mini-batch -------------------------------------------------------------------------------
def micro_batches(batch: TrainBatch, indices: list[int], size: int) -> list[list[int]]:
    """Split `indices` into chunks of `size` (0 = one chunk), similar lengths together."""
    if size <= 0 or size >= len(indices):
        return [list(indices)]
    ordered = sorted(indices, key=lambda i: len(batch.prompt_ids[i]) + len(batch.completion_ids[i]))
    return [ordered[s : s + size] for s in range(0, len(ordered), size)]


def minibatch_normalizer(batch: TrainBatch, indices: list[int], settings: UpdateSettings) -> float:
    """The loss denominator of the whole mini-batch (see `r1lab.rl.loss_normalizer`)."""
    width = max(max(len(batch.completion_ids[i]) for i in indices), 1)
    mask = torch.zeros((len(indices), width), dtype=torch.bool)
    for row, i in enumerate(indices):
        if batch.counted[i]:
            mask[row, : len(batch.completion_ids[i])] = True
    return loss_normalizer(mask, settings.aggregation, norm_length=settings.norm_length)


def rank_chunks(
    batch: TrainBatch, indices: list[int], size: int, split: bool = True
) -> list[list[int] | None]:
    """This rank's micro-batches of a mini-batch every rank holds whole.

    One process: `micro_batches(indices)`. Under FSDP, rank r trains on its contiguous share
    of `indices`, and every rank runs the same number of forwards (FSDP gathers weights in
    each one), so a rank with fewer chunks gets `None` entries: forwards whose loss is 0.
    """
    if not (split and distributed.active()):
        return micro_batches(batch, indices, size)
    world = distributed.world_size()

    def share(r: int) -> list[int]:
        return [indices[i] for i in distributed.shard_of(len(indices), r, world)]

    counts = [len(micro_batches(batch, share(r), size)) if share(r) else 0 for r in range(world)]
    mine = share(distributed.rank())
    chunks: list[list[int] | None] = list(micro_batches(batch, mine, size)) if mine else []
    return chunks + [None] * (max(counts) - len(chunks))


@torch.no_grad()
def sequence_logprobs(model, batch: TrainBatch, settings: UpdateSettings) -> list[torch.Tensor]:
    """Per-sequence completion log-probs under `model`'s current weights, without gradients.

    The old-policy pass before a rollout's first update (and any other frozen pass): the
    same micro-batches, layout and kernels as the policy pass. Under torchrun each rank
    runs its contiguous share (an FSDP rank whose share ran out runs a forward for the
    collectives the others make) and the ranks exchange their log-probs.
    """
    everything = list(range(len(batch)))
    mine: dict[int, torch.Tensor] = {}
    for chunk in rank_chunks(batch, everything, settings.micro_batch_size):
        if chunk is None and not distributed.is_sharded(model):
            continue
        mb = micro_batch(batch, chunk or everything[:1], settings, model.device)
        lp, _ = completion_logprobs(model, mb, settings)
        for row, i in enumerate(chunk or []):
            mine[i] = lp[row, : len(batch.completion_ids[i])].detach()
    if distributed.active():  # a float a token, through the CPU
        shares = distributed.all_gather_objects({i: t.cpu() for i, t in mine.items()})
        mine = {i: t for share in shares for i, t in share.items()}
    return [mine[i] for i in everything]


def _pad_rows(rows: list[torch.Tensor], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32, device=device)
    for r, t in enumerate(rows):
        out[r, : t.numel()] = t.to(device=device, dtype=torch.float32)
    return out


def sampler_gap(batch: TrainBatch, indices: list[int], logprobs: torch.Tensor) -> torch.Tensor:
    """Largest |training log-prob - sampler log-prob| over the tokens of `indices`, whose
    training log-probs are the rows of `logprobs` (n, width), as a scalar on their device
    (read without a host sync when the caller wants).

    Both are log p(token) under softmax(logits / T) from the same weights; they differ
    only by the numerics of the two paths (KV cache vs full forward, dtype). About 1e-6 on
    CPU in fp32; a large value means the ratio of the first update is not 1 where it
    should be, e.g. a dtype or temperature mismatch.
    """
    width = logprobs.shape[1]
    values = torch.zeros((len(indices), width))
    valid = torch.zeros((len(indices), width), dtype=torch.bool)
    for r, i in enumerate(indices):
        row = batch.sampler_logprobs[i][:width]
        values[r, : len(row)] = torch.tensor(row)
        valid[r, : len(row)] = True
    device = logprobs.device
    diff = (logprobs.detach().float() - fast_train.host_to_device(values, device)).abs()
    return torch.where(fast_train.host_to_device(valid, device), diff, 0.0).max()


# what a mini-batch's loop adds up on the device (the ratio statistics weighted by each
# micro-batch's counted tokens; `bad` counts NaN or infinite losses)
ADDED = ("loss", "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "bad")
RATIOS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean")
SUMMED = ("loss", "tokens", "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean")
SUMMED += ("train_tokens",)


def accumulate_gradients(
    policy,
    batch: TrainBatch,
    indices: list[int],
    settings: UpdateSettings,
    *,
    old_logprobs: list[torch.Tensor] | None = None,
    ref_model=None,
) -> dict[str, float]:
    """Backpropagate the GRPO loss of one mini-batch, micro-batch by micro-batch.

    The gradient is added to `.grad` (the caller zeroes and steps). Every micro-batch loss
    is divided by the same whole-mini-batch normaliser, so the summed gradient equals the
    one of a single pass over the mini-batch for any `micro_batch_size`.
    `old_logprobs=None` means on-policy: the current log-probs, detached. `ref_model` is
    needed when `settings.beta` > 0.
    Returns token-weighted stats; `finite` is False when a micro-batch loss was NaN or
    infinite (on any rank): the gradient added is then not to be stepped on (the caller
    zeroes it). The statistics are summed on the device and read once, after the loop.
    """
    normalizer = minibatch_normalizer(batch, indices, settings)  # of the whole mini-batch
    # under torchrun each rank trains on its share: an FSDP-sharded policy averages its
    # gradients over ranks (so the loss is scaled up by the world size); a policy every
    # rank holds whole (LoRA) sums them after the loop (`distributed.all_reduce_grads`)
    sharded = distributed.is_sharded(policy)
    split = distributed.active()
    scale = distributed.grad_scale() if sharded else 1.0
    use_ref = ref_model is not None and settings.beta > 0
    # The statistics stay on the device until the mini-batch is done: one host sync for
    # the whole loop, so the host queues the next micro-batch while the device works.
    added = torch.zeros(len(ADDED), dtype=torch.float32, device=policy.device)
    gap = torch.zeros((), dtype=torch.float32, device=policy.device)
    tokens = train_tokens = 0
    for chunk in rank_chunks(batch, indices, settings.micro_batch_size, split=split):
        if chunk is None:  # this rank's share ran out: the forwards FSDP needs, adding nothing
            if sharded:
                mb = micro_batch(batch, indices[:1], settings, policy.device)
                lp, _ = completion_logprobs(policy, mb, settings)
                if use_ref and distributed.is_sharded(ref_model):
                    with torch.no_grad():
                        completion_logprobs(ref_model, mb, settings)
                (lp.sum() * 0.0).backward()
            continue
        mb = micro_batch(batch, chunk, settings, policy.device)
        with phase("policy_forward"):
            lp, ent = completion_logprobs(policy, mb, settings, with_entropy=True)
        width = lp.shape[1]
        old = (
            lp.detach()
            if old_logprobs is None
            else _pad_rows([old_logprobs[i] for i in chunk], width, lp.device)
        )
        ref = None
        if use_ref:
            with torch.no_grad(), phase("reference"):
                ref, _ = completion_logprobs(ref_model, mb, settings)
        loss, stats = policy_loss(
            lp,
            old,
            mb.advantages,
            mb.mask,
            ref_logprobs=ref,
            beta=settings.beta,
            eps_low=settings.eps_low,
            eps_high=settings.eps_high,
            ratio_level=settings.ratio_level,
            aggregation=settings.aggregation,
            normalizer=normalizer,
        )
        # a NaN or infinite loss is found after the loop: its gradient is never stepped on
        with phase("backward"):
            (loss * scale if scale != 1.0 else loss).backward()
        n_tok = mb.counted_tokens
        if old_logprobs is None:
            gap = torch.maximum(gap, sampler_gap(batch, chunk, lp))
        added += torch.stack(
            [
                loss.detach().float(),
                (ent * mb.mask).sum().float(),
                *(stats[k].float() * n_tok for k in RATIOS),
                (~torch.isfinite(loss)).float(),
            ]
        )
        tokens += n_tok
        train_tokens += mb.train_tokens
    *values, largest_gap = torch.cat((added, gap[None])).tolist()  # the loop's one host sync
    sums = dict(zip(ADDED, values), logprob_diff=largest_gap)
    bad = sums["bad"] > 0
    if distributed.all_reduce_max(float(bad)) if split else bad:
        return {"finite": False}  # on every rank, so none sums or steps on it
    if split and not sharded:
        distributed.all_reduce_grads(policy)
    sums.update(tokens=float(tokens), train_tokens=float(train_tokens))
    if split:  # the mini-batch's numbers, not this rank's share of them
        for key, total in zip(SUMMED, distributed.all_reduce_sums([sums[k] for k in SUMMED])):
            sums[key] = total
        sums["logprob_diff"] = distributed.all_reduce_max(sums["logprob_diff"])
    n = max(sums["tokens"], 1.0)
    out = {key: sums[key] / n for key in ("entropy", *RATIOS)}
    out.update(
        loss=sums["loss"], tokens=sums["tokens"], train_tokens=sums["train_tokens"], finite=True
    )
    out["logprob_diff"] = sums["logprob_diff"]
    return out


# ---- activation memory --------------------------------------------------------------------------
MEMORY_MARGIN = 0.10  # of the GPU's memory, left free: fragmentation, the reference pass


def plan_activations(policy, optimizer, batch: TrainBatch, settings: UpdateSettings):
    """`settings` with `checkpoint_layers="auto"` replaced by how many layers to recompute.

    Recomputing a layer in the backward costs a second forward of it (a quarter of the
    policy pass's matrix work); keeping its activations costs memory that grows with the
    micro-batch's tokens. "auto" keeps as many layers as fit: this GPU's free memory (what
    the allocator holds unused included), less what the update will still allocate (the
    gradients, AdamW's moments before its first step, autocast's bf16 copies of the
    weights, the LM head's chunks) and a margin, over what a layer keeps per token and per
    call, measured on the model itself (`activation_memory.activation_bytes_per_token`).
    The largest micro-batch is bounded by the longest sequences that can share one.
    Elsewhere (CPU, padded path) nothing is recomputed or it does not apply, and "auto"
    stays for `completion_logprobs`. An FSDP2-sharded policy is not planned (its gathered
    root, layer prefetches and unsharded gradients are not in this budget): every layer.
    """
    if settings.checkpoint_layers != "auto" or not settings.packed:
        return settings
    if policy.device.type != "cuda":
        return settings
    if distributed.is_sharded(policy):
        declined("activation plan", "the policy is sharded by FSDP2 (not planned); every layer")
        return dataclasses.replace(settings, checkpoint_layers=True)
    lengths = sorted((len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)))
    share = -(-len(batch) // (settings.mini_batches * distributed.world_size()))
    tokens = sum(lengths[-(settings.micro_batch_size or share) :])
    params = list(policy.parameters())
    trainable = [p for p in params if p.requires_grad]

    def nbytes(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    still_to_allocate = nbytes(p for p in trainable if p.grad is None)
    if not optimizer.state:  # AdamW's two moments, allocated at its first step
        still_to_allocate += 2 * nbytes(trainable)
    if settings.compute_dtype != torch.float32:  # autocast keeps its casts through the pass
        still_to_allocate += sum(p.numel() for p in params if p.dtype == torch.float32) * 2
    vocab = policy.config.vocab_size
    still_to_allocate += 3 * settings.lm_head_chunk * vocab * 4  # logits, softmax, gradient
    free, total = torch.cuda.mem_get_info(policy.device)
    free += torch.cuda.memory_reserved(policy.device) - torch.cuda.memory_allocated(policy.device)
    budget = free - still_to_allocate - MEMORY_MARGIN * total
    try:
        with fast_train.autocast(policy, settings.compute_dtype):
            per_token, per_layer = activation_memory.activation_bytes_per_token(
                policy, settings.attention, settings.compile_layers
            )
    except Exception as exc:  # noqa: BLE001 - unmeasured: recompute every layer, and say so
        declined("activation plan", f"{type(exc).__name__}: {str(exc)[:160]}; every layer")
        return dataclasses.replace(settings, checkpoint_layers=True)
    hidden_bytes = policy.config.hidden_size * 4  # a recomputed layer keeps its input
    n = activation_memory.activation_plan(
        policy, tokens, budget, per_token, hidden_bytes, per_layer
    )
    return dataclasses.replace(settings, checkpoint_layers=n)


# ---- the rollout --------------------------------------------------------------------------------
def update_on_rollout(
    policy, optimizer, batch: TrainBatch, settings: UpdateSettings, *, step: int, ref_model=None
) -> dict[str, Any]:
    """`mu` epochs x `mini_batches` optimizer steps on one rollout; averaged stats.

    With one epoch of one mini-batch the update is on-policy: the old log-probs are the
    current ones detached (ratio exactly 1), no extra forward. Otherwise they are
    recomputed once, with the training forward and dtype, before the first update: the
    sampler's come from a KV-cache path (and possibly another dtype), and the ratio must
    compare like with like; the sampler's are only used for `logprob_diff`.
    A mini-batch whose loss or gradient is not finite is skipped (no optimizer step);
    `skipped` counts them.
    """
    settings = plan_activations(policy, optimizer, batch, settings)
    on_policy = settings.mu == 1 and settings.mini_batches == 1
    old = None if on_policy else sequence_logprobs(policy, batch, settings)
    gap = None
    if not on_policy:
        width = max(max(len(c) for c in batch.completion_ids), 1)
        rows = _pad_rows(old, width, policy.device)
        gap = float(sampler_gap(batch, list(range(len(batch))), rows))
    gen = torch.Generator().manual_seed(step)
    stats: list[dict] = []
    grad_norms: list[float] = []
    skipped = 0
    policy.train()
    for _epoch in range(settings.mu):
        order = (
            torch.randperm(len(batch), generator=gen).tolist()
            if not on_policy
            else list(range(len(batch)))
        )
        for part in range(settings.mini_batches):
            indices = order[part :: settings.mini_batches]
            if not indices:  # fewer sequences than mini-batches (a small kept batch)
                continue
            optimizer.zero_grad(set_to_none=True)
            result = accumulate_gradients(
                policy, batch, indices, settings, old_logprobs=old, ref_model=ref_model
            )
            with phase("optimizer"):
                norm = clip_grad(policy, settings.grad_clip) if result["finite"] else math.nan
                if not result["finite"] or not math.isfinite(norm):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                optimizer.step()
            stats.append(result)
            grad_norms.append(norm)
    optimizer.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"skipped": skipped, "optimizer_steps": len(stats)}
    if isinstance(settings.checkpoint_layers, int):  # the plan, or the count asked for
        out["checkpointed_layers"] = fast_train.checkpointed_layers(
            settings.checkpoint_layers, len(policy.model.layers)
        )
    if stats:
        for key in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "loss"):
            out[key] = sum(s[key] for s in stats) / len(stats)
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train_tokens"] = sum(s["train_tokens"] for s in stats)
        out["logprob_diff"] = gap if gap is not None else max(s["logprob_diff"] for s in stats)
    return out
