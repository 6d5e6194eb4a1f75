"""The fast training path for RL on rollouts: packed sequences, bf16 compute, chunked log-probs.

Why: a GRPO batch is hundreds of prompt + completion sequences of uneven length. Padding
them to one width wastes compute on pad tokens, the dense attention mask that padding
needs keeps attention off the fast kernels, and the full-vocabulary fp32 logits of a
batch (tokens x 150k x 4 bytes) dwarf the model. Here:

- `pack_rollouts` lays the sequences end to end with no padding, in micro-batches of at
  most `max_tokens` tokens; positions restart at 0 for every sequence;
- the decoder runs over a pack with a document-causal attention (FlashAttention's varlen
  kernel through `torch.nn.attention.varlen` on CUDA, so attention never crosses a
  sequence boundary and no mask is built); a padded SDPA fallback runs anywhere;
- the model's own modules do the rest, so gradients land on its parameters; with fp32
  master weights the forward runs under bf16 autocast (the optimizer, e.g. fused AdamW,
  updates the fp32 weights);
- log-probs of the completion tokens come from the LM head in chunks of positions through
  a custom autograd function that keeps only each chunk's log-sum-exp and recomputes the
  chunk's logits in the backward, so no (tokens x vocab) tensor outlives a chunk;
- each decoder layer can be checkpointed (recomputed in the backward) to bound memory;
- `completion_logprobs` runs the same packed path without gradients: the old-policy and
  reference passes are batched exactly like the policy pass.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from r1lab.rl.losses import loss_normalizer, policy_loss

ATTENTION_BACKENDS = ("auto", "varlen", "sdpa")


@dataclass
class PackedBatch:
    """Sequences laid end to end, and where their completion tokens are.

    `pred_index[i]` is the position whose next token `targets[i]` is a completion token;
    that token is number `col[i]` of the completion of packed sequence `local_row[i]`,
    which is row `rows[local_row[i]]` of the whole batch.
    """

    input_ids: torch.Tensor  # (T,)
    position_ids: torch.Tensor  # (T,)
    cu_seqlens: torch.Tensor  # (n + 1,) int32
    max_seqlen: int
    rows: torch.Tensor  # (n,)
    pred_index: torch.Tensor  # (M,)
    targets: torch.Tensor  # (M,)
    local_row: torch.Tensor  # (M,)
    col: torch.Tensor  # (M,)
    width: int  # the longest completion of the whole batch: the (N, width) layout

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.rows.shape[0]

    def to(self, device) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return PackedBatch(**moved)


def pack_rollouts(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    max_tokens: int = 16384,
    device=None,
) -> list[PackedBatch]:
    """Micro-batches of whole sequences (prompt + completion), each at most `max_tokens` long.

    Sequences keep their order; a sequence longer than `max_tokens` gets a micro-batch of
    its own. Prompts must hold at least one token (the first completion token is predicted
    from the last prompt token).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max((len(c) for c in completions), default=0)
    groups: list[list[int]] = [[]]
    used = 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        if groups[-1] and used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return [_pack(prompts, completions, g, width, device) for g in groups if g]


def _pack(prompts, completions, rows: list[int], width: int, device) -> PackedBatch:
    ids: list[int] = []
    pos: list[int] = []
    cu = [0]
    pred, tgt, local, col = [], [], [], []
    for j, i in enumerate(rows):
        p, c = list(prompts[i]), list(completions[i])
        start = len(ids)
        ids += p + c
        pos += range(len(p) + len(c))
        cu.append(len(ids))
        first = start + len(p) - 1
        pred += range(first, first + len(c))
        tgt += c
        local += [j] * len(c)
        col += range(len(c))
    lengths = [b - a for a, b in zip(cu, cu[1:])]

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return PackedBatch(
        input_ids=t(ids),
        position_ids=t(pos),
        cu_seqlens=t(cu, torch.int32),
        max_seqlen=max(lengths),
        rows=t(rows),
        pred_index=t(pred),
        targets=t(tgt),
        local_row=t(local),
        col=t(col),
        width=width,
    )


def completion_mask(completions: Sequence[Sequence[int]], width: int | None = None, device=None):
    """(N, width) bool: True on the real tokens of each completion."""
    width = width if width is not None else max((len(c) for c in completions), default=0)
    lengths = torch.tensor([len(c) for c in completions], device=device)
    return torch.arange(width, device=device)[None, :] < lengths[:, None]


# ---- attention over a pack ----------------------------------------------------------------------
_VARLEN_OK: dict[tuple, dict | None] = {}


def _varlen_call(q, k, v, cu, max_len, options: dict):
    from torch.nn.attention.varlen import varlen_attn

    if options.get("repeat_kv"):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    kwargs = {k_: v_ for k_, v_ in options.items() if k_ != "repeat_kv"}
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _varlen_options(
    device: torch.device, dtype: torch.dtype, h: int, kv: int, d: int
) -> dict | None:
    """How to call `varlen_attn` causally with grouped KV heads on this torch, or None.

    The function's keywords changed between torch releases (`is_causal` became
    `window_size=(-1, 0)`, `enable_gqa` appeared), so the options are read off its
    signature and checked once, forward and backward, against the padded path.
    """
    key = (str(device), dtype, h, kv, d)
    if key in _VARLEN_OK:
        return _VARLEN_OK[key]
    _VARLEN_OK[key] = None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    tries = [causal, {**causal, "repeat_kv": True}]
    if "enable_gqa" in params:
        tries.insert(0, {**causal, "enable_gqa": True})
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = [5, 17, 1, 9]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(device)
    t = sum(lengths)
    base = [torch.randn(t, n, d, generator=gen) for n in (h, kv, kv)]
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        ref_in = [x.to(device, dtype).requires_grad_() for x in base]
        ref = _padded_attention(*ref_in, cu, max(lengths))
        ref.float().square().sum().backward()
        for options in tries:
            try:
                xs = [x.to(device, dtype).requires_grad_() for x in base]
                out = _varlen_call(*xs, cu, max(lengths), options).reshape(t, -1)
                out.float().square().sum().backward()
                errs = [(out - ref).abs().max()]
                errs += [(a.grad - b.grad).abs().max() for a, b in zip(xs, ref_in)]
                if max(e.item() for e in errs) < 0.05:
                    _VARLEN_OK[key] = options
                    return options
            except Exception:  # noqa: BLE001 - any failure means: not this way
                continue
    return None


def _padded_attention(q, k, v, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """Document-causal attention by padding each sequence to `max_len` (right padding).

    With right padding, causal attention never lets a real token see a pad, so plain
    `is_causal` SDPA is exact; pads are computed and dropped. Works on every device.
    """
    t, h, d = q.shape
    kv = k.shape[1]
    starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    ar = torch.arange(max_len, device=q.device)
    index = (starts[:, None] + ar[None, :]).clamp(max=t - 1)
    valid = ar[None, :] < lengths[:, None]

    def pad(x):
        return x[index].transpose(1, 2)  # (n, heads, max_len, d)

    qp, kp, vp = pad(q), pad(k), pad(v)
    if kv != h:
        kp, vp = kp.repeat_interleave(h // kv, 1), vp.repeat_interleave(h // kv, 1)
    out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    return out.transpose(1, 2)[valid].reshape(t, h * d)


def _attention_fn(backend: str, batch: PackedBatch, model):
    """(q (T, H, D), k, v (T, KV, D)) -> (T, H * D) for one pack, by the chosen backend."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    cu, max_len = batch.cu_seqlens, batch.max_seqlen
    dev = model.device
    dtype = (
        torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.dtype
    )
    options = None
    if backend == "varlen" or (
        backend == "auto" and dev.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    ):
        cfg = model.config
        options = _varlen_options(
            dev, dtype, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        )
        if options is None and backend == "varlen":
            raise RuntimeError("varlen attention is not usable here (needs CUDA and fp16/bf16)")

    def attend(q, k, v):
        if options is None:
            return _padded_attention(q, k, v, cu, max_len)
        return _varlen_call(q, k, v, cu, max_len, options).reshape(q.shape[0], -1)

    return attend


# ---- the decoder over a pack -------------------------------------------------------------------
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (T, heads, D) with cos/sin (T, 1, D/2), in fp32 as the model's `apply_rope`."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _layer_forward(layer, x, cos, sin, attend):
    """One decoder layer on (T, hidden) through the model's own modules."""
    a = layer.self_attn
    t = x.shape[0]
    h = layer.input_layernorm(x)
    q = a.q_proj(h).view(t, a.n_heads, a.head_dim)
    k = a.k_proj(h).view(t, a.n_kv, a.head_dim)
    v = a.v_proj(h).view(t, a.n_kv, a.head_dim)
    if a.q_norm is not None:
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    x = x + a.o_proj(attend(q, k, v))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def packed_hidden_states(
    model, batch: PackedBatch, attention: str = "auto", checkpoint: bool = False
) -> torch.Tensor:
    """Final-norm hidden states (T, hidden) of a pack; attention stays inside each sequence."""
    freqs = batch.position_ids.float()[:, None] * model.inv_freq[None, :]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    attend = _attention_fn(attention, batch, model)
    x = model.model.embed_tokens(batch.input_ids)
    for layer in model.model.layers:
        if checkpoint and torch.is_grad_enabled():
            x = _checkpoint(_layer_forward, layer, x, cos, sin, attend, use_reentrant=False)
        else:
            x = _layer_forward(layer, x, cos, sin, attend)
    return model.model.norm(x)


# ---- log-probs through the LM head in chunks ----------------------------------------------------
class _ChunkedLogprobs(torch.autograd.Function):
    """log softmax(h @ W.T / T)[target] for every row of h, one chunk of rows at a time.

    Saves only the inputs and each row's log-sum-exp; the backward recomputes a chunk's
    logits, turns them into (onehot - softmax) * grad / T, and multiplies back into the
    gradients of h and W. Peak extra memory is one chunk's logits, not the batch's.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, compute_dtype):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk_size):
            logits = F.linear(h[s : s + chunk_size], w).float()
            if temperature != 1.0:
                logits.div_(temperature)
            lse[s : s + chunk_size] = torch.logsumexp(logits, -1)
            picked = logits.gather(1, targets[s : s + chunk_size, None])[:, 0]
            out[s : s + chunk_size] = picked - lse[s : s + chunk_size]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size, ctx.compute_dtype = temperature, chunk_size, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        cd, temp, chunk = ctx.compute_dtype, ctx.temperature, ctx.chunk_size
        h, w = hidden.to(cd), weight.to(cd)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        grad_out = grad_out.float() / temp
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            p = F.linear(hc, w).float()
            if temp != 1.0:
                p.div_(temp)
            p.sub_(lse[s : s + chunk, None]).exp_()
            g = grad_out[s : s + chunk, None]
            p.mul_(-g).scatter_add_(1, targets[s : s + chunk, None], g)
            d = p.to(cd)
            del p
            if grad_h is not None:
                grad_h[s : s + chunk] = d @ w
            grad_w += (d.t() @ hc).float()
        grad_h = grad_h.to(hidden.dtype) if grad_h is not None else None
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Token log-probs (M,) fp32 from hidden states (M, d) and the LM head weight (V, d).

    Matmuls run in the autocast dtype when autocast is on (else in the inputs' dtype);
    softmax statistics are fp32.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(dev, enabled=False):
        return _ChunkedLogprobs.apply(
            hidden, weight, targets, float(temperature), int(chunk_size), compute_dtype
        )


def _autocast(model, amp: bool | None):
    """bf16 autocast when the weights are fp32 on CUDA (fp32 master weights), unless told."""
    if amp is None:
        amp = model.device.type == "cuda" and model.dtype == torch.float32
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


def packed_logprobs(
    model,
    batch: PackedBatch,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    attention: str = "auto",
    checkpoint: bool = False,
    amp: bool | None = None,
) -> torch.Tensor:
    """Log-prob (M,) of each completion token of a pack under `model` (differentiable)."""
    with _autocast(model, amp):
        hidden = packed_hidden_states(model, batch, attention, checkpoint)
        picked = hidden.index_select(0, batch.pred_index)
        return chunked_logprobs(
            picked, model.lm_head.weight, batch.targets, temperature, chunk_size
        )


def to_rows(values: torch.Tensor, batch: PackedBatch, fill: float = 0.0) -> torch.Tensor:
    """(M,) per-token values of a pack -> (n, width), one row per packed sequence."""
    out = values.new_full((batch.num_sequences, batch.width), fill)
    return out.index_put((batch.local_row, batch.col), values)


@torch.no_grad()
def completion_logprobs(
    model, batches: Sequence[PackedBatch], num_rows: int, **options
) -> torch.Tensor:
    """(N, width) log-probs of every completion token (0 on padding), without gradients.

    The old-policy and reference passes: same packing and kernels as the policy pass.
    """
    width = batches[0].width if batches else 0
    out = torch.zeros(num_rows, width, device=model.device)
    for b in batches:
        out[b.rows] = to_rows(packed_logprobs(model, b, **options), b)
    return out


def grpo_backward(
    model,
    batches: Sequence[PackedBatch],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    attention: str = "auto",
    checkpoint: bool = True,
    amp: bool | None = None,
    **loss_options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the gradient of the whole batch's policy loss, one pack at a time.

    `advantages` (N,), `mask`, `old_logprobs`, `ref_logprobs` (N, width) cover the whole
    batch; `old_logprobs=None` means one optimizer step per rollout (the ratio is 1 and
    its gradient that of the log-probs, as with detached current log-probs). The whole
    batch's denominator is passed to every pack, so the summed pack losses equal the
    full-batch loss. Returns that loss (detached) and token-weighted means of the stats.
    """
    aggregation = loss_options.get("aggregation", "seq-mean-token-mean")
    normalizer = loss_normalizer(mask, aggregation, loss_options.get("norm_length"))
    total = torch.zeros((), device=model.device)
    stats: dict[str, torch.Tensor] = {}
    weight_sum = mask.sum().clamp(min=1).float()
    for b in batches:
        lp = to_rows(
            packed_logprobs(model, b, temperature, chunk_size, attention, checkpoint, amp), b
        )
        rows = b.rows
        old = lp.detach() if old_logprobs is None else old_logprobs[rows]
        ref = None if ref_logprobs is None else ref_logprobs[rows]
        loss, st = policy_loss(
            lp,
            old,
            advantages[rows],
            mask[rows],
            ref_logprobs=ref,
            beta=beta,
            normalizer=normalizer,
            **loss_options,
        )
        loss.backward()
        total += loss.detach()
        w = mask[rows].sum().float() / weight_sum
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + v * w
    return total, stats
