"""One decode step's fused operations, two ways: Triton kernel launches, and plain torch.

`DecodeEngine` calls the same six operations on whichever backend it holds:
`add_rmsnorm`, `rope_attention`, `silu_mul`, `sample`, `record_and_embed`, `advance`.
`TritonOps` launches the kernels of `decode_kernels` (CUDA, or Triton's interpreter);
`TorchOps` does the same with torch ops, for the CPU and as the reference the kernels are
checked against. Its math is the model's own (`rms_norm`, `apply_rope`, `swiglu` from
`r1lab.model.transformer`), so the fallback cannot drift from the decoder.

The launch shapes below are module attributes read at every launch, so
`benchmarks/decode_kernels.py` can sweep them and `grpo_step.py --kernel-config` set them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from r1lab.engine import decode_kernels as kernels
from r1lab.engine.decode_kernels import HAS_TRITON, triton
from r1lab.engine.sampling import draw_tokens, uniforms
from r1lab.model.transformer import apply_rope, rms_norm, swiglu

MAX_STOP_IDS = 16  # stop tokens held in a fixed-size device buffer
# Launch shapes of the decode kernels (measured on an H200: benchmarks/RESULTS.md).
# The attention's (cached keys per loop step, warps) by head dim, from the sweep of
# benchmarks/decode_kernels.py at GRPO's batch (256 rows, a 384-key cache): at D = 128 32
# keys and 4 warps (31.5 us a layer at 1.5B, 39.7 us at 64 and 2); at D = 64 64 and 2
# (17.9 us at 0.5B). Other head dims take 64 and 2. ATTN_BLOCK_N / ATTN_WARPS, when set,
# override them at every head dim (the sweep sets them).
ATTN_SHAPES = {64: (64, 2), 128: (32, 4)}
ATTN_BLOCK_N: int | None = None
ATTN_WARPS: int | None = None
# Split-K: cached keys per program when the cache is split (0: never split). The single
# pass runs one program per (row, KV head); at GRPO's 256 rows x 2 KV heads (512 programs)
# it was faster than every split size swept (64-256 keys: 37-60 us against 31.5 at 1.5B),
# so it is used whenever it launches at least ATTN_SPLIT_BELOW programs (None: the GPU's
# SM count). Below that some SMs would idle through the whole cache (a few rows over a
# long cache, as in evaluation) and splitting it is what keeps them busy.
ATTN_SPLIT_KEYS = 256
ATTN_SPLIT_BELOW: int | None = None
SAMPLE_BLOCK, SAMPLE_SPLITS = 1024, 32  # vocabulary columns per loop step; slices per row

__all__ = ["HAS_TRITON", "MAX_STOP_IDS", "TorchOps", "TritonOps", "attention_partials"]


def _split_keys(rows: int, n_kv: int, max_len: int, device) -> int:
    """Cached keys per attention split; 0: the single pass (enough programs to fill the
    GPU, or a cache of one split)."""
    if not 0 < ATTN_SPLIT_KEYS < max_len:
        return 0
    below = ATTN_SPLIT_BELOW if ATTN_SPLIT_BELOW is not None else _sm_count(str(device))
    return ATTN_SPLIT_KEYS if rows * n_kv < below else 0


@functools.cache
def _sm_count(device: str) -> int:
    """Streaming multiprocessors of a CUDA device (0 elsewhere), read once per device."""
    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 0


def _attention_launch(head_dim: int) -> tuple[int, int]:
    """(cached keys per loop step, warps) of the attention program at this head dim."""
    block_n, warps = ATTN_SHAPES.get(head_dim, (64, 2))
    return ATTN_BLOCK_N or block_n, ATTN_WARPS or warps


def _query_block(rep: int) -> int:
    """Rows of the query matrix of one KV head: REP, padded to a power of two of 16 or more
    (the smallest `tl.dot` operand)."""
    return max(16, 1 << (rep - 1).bit_length())


def attention_partials(rows, n_heads, n_kv, head_dim, max_len, device):
    """Scratch of the split-K attention at the current `ATTN_SPLIT_KEYS`: each (row, KV
    head, split, query head)'s running max m, sum l and unnormalised output acc, in fp32;
    None for the single pass. One set serves every layer (they run one after the other)."""
    split_keys = _split_keys(rows, n_kv, max_len, device)
    if not split_keys:
        return None
    shape = (rows, n_kv, -(-max_len // split_keys), _query_block(n_heads // n_kv))
    m = torch.empty(shape, device=device, dtype=torch.float32)
    return m, torch.empty_like(m), torch.empty(*shape, head_dim, device=device, dtype=m.dtype)


class TritonOps:
    """Launches the kernels of `decode_kernels`; every buffer is contiguous and preallocated by the engine."""

    def add_rmsnorm(self, x, add, w, out, eps):
        n = x.shape[-1]
        kernels.add_rmsnorm_kernel[(x.shape[0],)](
            x,
            add if add is not None else x,
            w,
            out,
            eps,
            n,
            BLOCK=triton.next_power_of_2(n),
            HAS_ADD=add is not None,
        )

    def rope_attention(self, e, qkv, out, layer):
        """One program per (row, KV head) over the whole cache, or one per (row, KV head,
        split of ATTN_SPLIT_KEYS keys) and then their combine: a grid fixed by max_len,
        whatever the slot, so one captured graph serves every step."""
        rep = e.n_heads // e.n_kv
        split_keys = _split_keys(e.rows, e.n_kv, e.max_len, e.device)
        block_n, warps = _attention_launch(e.head_dim)
        splits = triton.cdiv(e.max_len, split_keys) if split_keys else 1
        parts = e.attn_partials
        if split_keys and (parts is None or parts[0].shape[2] != splits):
            # the split size changed since the engine was built (a benchmark's sweep):
            # reallocated, and the graphs captured over the old scratch are dropped (a
            # replay would write into freed memory), to be captured again on their next use
            parts = e.attn_partials = attention_partials(
                e.rows, e.n_heads, e.n_kv, e.head_dim, e.max_len, e.device
            )
            if getattr(e, "graphs", None):
                e.graphs.clear()
        part_m, part_l, part_acc = parts if split_keys else (out, out, out)  # unused if 0
        heads = dict(H=e.n_heads, KV=e.n_kv, D=e.head_dim, REP=rep, QB=_query_block(rep))
        kernels.rope_decode_attn_kernel[(qkv.shape[0], e.n_kv, splits)](
            qkv,
            e.k_cache[layer],
            e.v_cache[layer],
            e.cos,
            e.sin,
            e.positions,
            e.key_ok,
            e.slot,
            out,
            part_m,
            part_l,
            part_acc,
            1.0 / math.sqrt(e.head_dim),
            e.max_len,
            **heads,
            BLOCK_N=block_n,
            SPLIT_KEYS=split_keys,
            IEEE=e.dtype == torch.float32,
            num_warps=warps,
        )
        if split_keys:
            kernels.attn_combine_kernel[(qkv.shape[0], e.n_kv)](
                part_m, part_l, part_acc, e.slot, out, splits, **heads, SPLIT_KEYS=split_keys,
                SPLITS_P2=triton.next_power_of_2(splits), num_warps=warps,
            )  # fmt: skip

    def record_and_embed(self, e):
        kernels.record_embed_kernel[(e.rows,)](
            e.sampled, e.sampled_lp, e.finished, e.lengths, e.stop_ids, e.step, e.out_tokens,
            e.out_logprobs, e.tokens, e.embed, e.ln1[0], e.x, e.h, e.pad_id, e.max_len,
            e.hidden, e.eps, NSTOP=MAX_STOP_IDS, BLOCK=triton.next_power_of_2(e.hidden),
        )  # fmt: skip

    def advance(self, e):
        kernels.advance_kernel[(1,)](e.positions, e.slot, e.step, e.rows, e.max_len - 1, BLOCK=1024)

    def silu_mul(self, gu, out):
        ff = out.shape[-1]
        kernels.silu_mul_kernel[(gu.shape[0], triton.cdiv(ff, 1024))](gu, out, ff, BLOCK=1024)

    def sample(self, e, logits, filtered, greedy):
        rows, vocab = logits.shape
        block = min(SAMPLE_BLOCK, max(16, triton.next_power_of_2(vocab)))
        splits = min(SAMPLE_SPLITS, triton.next_power_of_2(triton.cdiv(vocab, block)))
        chunk = triton.cdiv(triton.cdiv(vocab, splits), block) * block
        if e.sample_stats is None or e.sample_stats.shape[1] != splits:
            # allocated in the warm-up steps, before any graph capture
            e.sample_stats = torch.empty(rows, splits, 5, device=e.device, dtype=torch.float32)
            e.sample_index = torch.empty(rows, splits, device=e.device, dtype=torch.int32)
        filt = filtered if filtered is not None else logits
        kernels.sample_stats_kernel[(rows, splits)](
            logits, filt, vocab, chunk, e.temperature, e.sample_stats, e.sample_index,
            SPLITS=splits, FILTERED=filtered is not None, BLOCK=block,
        )  # fmt: skip
        kernels.sample_pick_kernel[(rows,)](
            logits, filt, vocab, chunk, e.temperature, e.row_keys, e.step, e.sample_stats,
            e.sample_index, e.sampled, e.sampled_lp, SPLITS=splits, GREEDY=greedy,
            FILTERED=filtered is not None, BLOCK=block,
        )  # fmt: skip


class TorchOps:
    """The same operations in plain torch: for the CPU and for checking the kernels."""

    def add_rmsnorm(self, x, add, w, out, eps):
        if add is not None:
            x.add_(add)
        out.copy_(rms_norm(x, w, eps))

    def rope_attention(self, e, qkv, out, layer):
        r, h, kv, d = qkv.shape[0], e.n_heads, e.n_kv, e.head_dim
        q = qkv[:, : h * d].view(r, h, d)
        k = qkv[:, h * d : (h + kv) * d].view(r, kv, d)
        v = qkv[:, (h + kv) * d :].view(r, kv, d)
        cos = e.cos.index_select(0, e.positions)[:, None, :]
        sin = e.sin.index_select(0, e.positions)[:, None, :]
        q = apply_rope(q, cos, sin)
        e.k_cache[layer].index_copy_(2, e.slot, apply_rope(k, cos, sin).unsqueeze(2))
        e.v_cache[layer].index_copy_(2, e.slot, v.unsqueeze(2))
        rep = h // kv
        visible = e.key_ok & (torch.arange(e.max_len, device=q.device) <= e.slot)
        qg = q.view(r, e.n_kv, rep, e.head_dim)
        a = F.scaled_dot_product_attention(
            qg, e.k_cache[layer], e.v_cache[layer], attn_mask=visible[:, None, None, :]
        )
        out.copy_(a.reshape(r, -1))

    def record_and_embed(self, e):
        tok = torch.where(e.finished, e.pad_id, e.sampled)
        e.out_tokens.index_copy_(1, e.step, tok[:, None])
        e.out_logprobs.index_copy_(1, e.step, e.sampled_lp[:, None])
        stopped = (tok[:, None] == e.stop_ids[None, :]).any(-1) & ~e.finished
        e.lengths.copy_(torch.where(stopped, e.step + 1, e.lengths))
        e.finished.logical_or_(stopped)
        e.tokens.copy_(tok)
        torch.index_select(e.embed, 0, e.tokens, out=e.x)
        self.add_rmsnorm(e.x, None, e.ln1[0], e.h, e.eps)

    def advance(self, e):
        e.positions.add_(1)
        # the last step's forward writes one slot past the outputs; keep both inside the buffers
        e.slot.add_(1).clamp_(max=e.max_len - 1)
        e.step.add_(1).clamp_(max=e.max_len - 1)

    def silu_mul(self, gu, out):
        ff = out.shape[-1]
        out.copy_(swiglu(gu[:, :ff], gu[:, ff:]))

    def sample(self, e, logits, filtered, greedy):
        x = logits.float() / e.temperature
        lse = torch.logsumexp(x, -1)
        score = x if filtered is None else filtered.float() / e.temperature
        tok = score.argmax(-1) if greedy else draw_tokens(score, uniforms(e.row_keys, e.step))
        e.sampled.copy_(tok)
        e.sampled_lp.copy_(x.gather(-1, tok[:, None])[:, 0] - lse)
