"""The GPU fast path of `sample()`: a static KV cache and a decode step replayed as a CUDA graph.

Why it exists: at GRPO's shape (hundreds of rows, one new token each) a decode step must
read about a gigabyte of weights and KV cache, well under a millisecond on an H200, but the
eager sampler spends far longer launching hundreds of small kernels, expanding the shared
KV heads, sampling through several passes over the vocabulary and syncing with the host
for every token. Here:

- the weights are copied into the engine's own buffers at the start of each call (bf16 by
  default, whatever the policy's master dtype), with q/k/v and gate/up each fused into one
  matrix so a layer is four matmuls;
- the KV cache is preallocated for (rows, prompt width + max_new_tokens), and everything a
  step reads or writes (token, position, cache slot, step count, finished flags, outputs)
  lives in device buffers, so one captured CUDA graph serves every step and the host only
  replays it;
- small Triton kernels fuse what would be many launches: residual add + RMSNorm; RoPE,
  the cache write and grouped-query decode attention (each row's cache read up to the
  current slot) in one kernel; SiLU * up; and sampling (temperature, Gumbel-max, log-prob)
  in one pass over the vocabulary, cut into slices so that small batches fill the GPU,
  then a draw by inverting the CDF within one slice;
- each prompt is prefilled once and its cache copied to its `n` rows (the GRPO group);
- the host looks at the finished flags every `CHECK_EVERY` steps only, and stops as soon
  as every row has stopped.

The same step runs with plain torch ops and no graph where Triton is missing (and on the
CPU, to check the logic); `sample()` only dispatches here on CUDA.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1lab.engine.generate import (
    Completion,
    SamplingParams,
    _left_pad,
    _stop_ids,
    _StopChecker,
)

try:  # Triton ships with CUDA builds of torch; the CPU build has none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False

CHECK_EVERY = 16  # decode steps between two looks at the finished flags (one host sync)
MAX_STOP_IDS = 16  # stop tokens held in a fixed-size device buffer
# Launch shapes of the decode kernels (measured on an H200: benchmarks/RESULTS.md).
ATTN_BLOCK_N, ATTN_WARPS = 64, 2  # cached keys per loop step; warps per (row, KV head)
SAMPLE_BLOCK, SAMPLE_SPLITS = 1024, 32  # vocabulary columns per loop step; slices per row
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAST_STATS: dict = {}


def enabled() -> bool:
    """The fast path is on unless R1LAB_FAST_SAMPLER=0 (to force the reference sampler)."""
    return os.environ.get("R1LAB_FAST_SAMPLER", "1") != "0"


def applicable(model, params: SamplingParams) -> bool:
    """Whether `sample()` should hand this call to the engine."""
    if not enabled() or model.device.type != "cuda" or not HAS_TRITON:
        return False
    cfg = model.config
    head_ok = cfg.head_dim in (32, 64, 128, 256)
    return head_ok and len(_stop_ids(model, None, params)) <= MAX_STOP_IDS


def last_stats() -> dict:
    """Timings of the most recent fast call: prefill and decode milliseconds, steps run."""
    return dict(_LAST_STATS)


def release(model) -> None:
    """Free the engine (weights copy, KV cache, graphs) kept for `model` between calls."""
    _ENGINES.pop(model, None)


# ---- Triton kernels ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _store_rmsnorm(x, w_ptr, out_row_ptr, offs, m, N, eps):
        """out = w * rmsnorm(x) for one row x, rounded where the RMSNorm module rounds."""
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        y = (xf * inv).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_row_ptr + offs, (w * y).to(out_row_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr, add_ptr, w_ptr, out_ptr, eps, N, BLOCK: tl.constexpr, HAS_ADD: tl.constexpr
    ):
        """x += add (rounded to x's dtype, in place); out = w * rmsnorm(x), as RMSNorm rounds."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + row * N + offs, mask=m, other=0.0)
        if HAS_ADD:
            a = tl.load(add_ptr + row * N + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + a.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * N + offs, x, mask=m)
        _store_rmsnorm(x, w_ptr, out_ptr + row * N, offs, m, N, eps)

    @triton.jit
    def _rope_decode_attn_kernel(
        qkv_ptr,
        kc_ptr,
        vc_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        ok_ptr,
        slot_ptr,
        out_ptr,
        scale,
        L,
        H: tl.constexpr,
        KV: tl.constexpr,
        D: tl.constexpr,
        REP: tl.constexpr,
        QB: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One row, one KV head: RoPE, the new key and value into the cache, then attention.

        The REP query heads that share a KV head are the rows of one small matrix, so the
        cached keys and values are read once for all of them and never expanded. Rotated
        vectors stay as two halves (dot products add the halves), so nothing is re-joined.
        The new token's key is used from registers, not read back from the cache, so the
        cache write needs no barrier; the cached keys are slots 0 .. slot - 1.
        """
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        half = tl.arange(0, D // 2)
        d = tl.arange(0, D)
        qi = tl.arange(0, QB)
        qmask = qi < REP
        stride = (H + 2 * KV) * D
        pos = tl.load(pos_ptr + row)
        slot = tl.load(slot_ptr)
        cos = tl.load(cos_ptr + pos * (D // 2) + half)
        sin = tl.load(sin_ptr + pos * (D // 2) + half)
        dt = kc_ptr.dtype.element_ty
        # the new key (rotated, rounded as the cache holds it) and value, into the cache
        k_src = qkv_ptr + row * stride + (H + kvh) * D
        k1 = tl.load(k_src + half).to(tl.float32)
        k2 = tl.load(k_src + D // 2 + half).to(tl.float32)
        k1, k2 = (k1 * cos - k2 * sin).to(dt), (k2 * cos + k1 * sin).to(dt)
        v_new = tl.load(qkv_ptr + row * stride + (H + KV + kvh) * D + d)
        base = (row * KV + kvh) * L * D
        tl.store(kc_ptr + base + slot * D + half, k1)
        tl.store(kc_ptr + base + slot * D + D // 2 + half, k2)
        tl.store(vc_ptr + base + slot * D + d, v_new)
        # the REP query heads, rotated, as two (QB, D/2) halves
        q_src = qkv_ptr + row * stride + (kvh * REP + qi[:, None]) * D
        q1 = tl.load(q_src + half[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_src + D // 2 + half[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
        q1, q2 = (q1 * cos - q2 * sin).to(dt), (q2 * cos + q1 * sin).to(dt)
        # the new key first: every row's own token is a valid key
        m_i = (
            tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], 1)
            + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], 1)
        ) * scale
        l_i = tl.full([QB], 1.0, dtype=tl.float32)
        acc = tl.zeros([QB, D], dtype=tl.float32) + v_new.to(tl.float32)[None, :]
        for start in range(0, slot, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            in_range = j < slot
            ok = tl.load(ok_ptr + row * L + j, mask=in_range, other=0) != 0
            k_off = base + j[:, None] * D
            ka = tl.load(kc_ptr + k_off + half[None, :], mask=in_range[:, None], other=0.0)
            kb = tl.load(kc_ptr + k_off + D // 2 + half[None, :], mask=in_range[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q1, tl.trans(ka), input_precision="ieee")
                s = tl.dot(q2, tl.trans(kb), s, input_precision="ieee")
            else:
                s = tl.dot(q2, tl.trans(kb), tl.dot(q1, tl.trans(ka)))
            s = tl.where((in_range & ok)[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vc_ptr + k_off + d[None, :], mask=in_range[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        o_off = (row * H + kvh * REP + qi[:, None]) * D + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=qmask[:, None])

    @triton.jit
    def _record_embed_kernel(
        sampled_ptr,
        sampled_lp_ptr,
        finished_ptr,
        lengths_ptr,
        stop_ptr,
        step_ptr,
        out_tok_ptr,
        out_lp_ptr,
        tokens_ptr,
        embed_ptr,
        ln_ptr,
        x_ptr,
        h_ptr,
        pad_id,
        L,
        N,
        eps,
        NSTOP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row after the pick: record the token (the pad once the row has finished) and
        its log-prob, mark a stop, then embed the token and RMS-normalise it for layer 0.

        Replaces a dozen one-line launches per decode step with one.
        """
        row = tl.program_id(0).to(tl.int64)
        step = tl.load(step_ptr)
        was = tl.load(finished_ptr + row).to(tl.int32)
        fin = was != 0
        tok = tl.where(fin, pad_id, tl.load(sampled_ptr + row))
        tl.store(out_tok_ptr + row * L + step, tok)
        tl.store(out_lp_ptr + row * L + step, tl.load(sampled_lp_ptr + row))
        stops = tl.load(stop_ptr + tl.arange(0, NSTOP))
        stopped = (tl.sum((stops == tok).to(tl.int32), 0) > 0) & (was == 0)
        length = tl.load(lengths_ptr + row)
        tl.store(lengths_ptr + row, tl.where(stopped, step + 1, length))
        tl.store(finished_ptr + row, (fin | stopped).to(finished_ptr.dtype.element_ty))
        tl.store(tokens_ptr + row, tok)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(embed_ptr + tok * N + offs, mask=m, other=0.0)
        tl.store(x_ptr + row * N + offs, x, mask=m)
        _store_rmsnorm(x, ln_ptr, h_ptr + row * N, offs, m, N, eps)

    @triton.jit
    def _advance_kernel(pos_ptr, slot_ptr, step_ptr, rows, last, BLOCK: tl.constexpr):
        """After a step's forward: every position, the cache slot and the step count + 1.

        The last step's forward writes one slot past the outputs; slot and step are kept
        inside the buffers.
        """
        for start in range(0, rows, BLOCK):
            r = start + tl.arange(0, BLOCK)
            tl.store(pos_ptr + r, tl.load(pos_ptr + r, mask=r < rows) + 1, mask=r < rows)
        tl.store(slot_ptr, tl.minimum(tl.load(slot_ptr) + 1, last))
        tl.store(step_ptr, tl.minimum(tl.load(step_ptr) + 1, last))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, FF, BLOCK: tl.constexpr):
        """out = silu(gate) * up from the fused gate|up projection, rounded as torch does."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < FF
        g = tl.load(gu_ptr + row * 2 * FF + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * FF + FF + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * FF + cols, (s * u).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _sample_stats_kernel(
        logits_ptr,
        filt_ptr,
        V,
        CHUNK,
        temp_ptr,
        stats_ptr,
        idx_ptr,
        SPLITS: tl.constexpr,
        FILTERED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One slice of one row: max and sum of exp of logits/T, of the sampling scores
        (the filtered logits, or the same), and the slice's first highest score."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        inv_t = 1.0 / tl.load(temp_ptr)
        lane = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        fm = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        fs = tl.zeros([BLOCK], dtype=tl.float32)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK], dtype=tl.int32)
        for offset in range(0, CHUNK, BLOCK):
            cols = split * CHUNK + offset + lane
            cm = cols < V
            x = tl.load(logits_ptr + row * V + cols, mask=cm, other=float("-inf"))
            x = x.to(tl.float32) * inv_t
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
            if FILTERED:
                f = tl.load(filt_ptr + row * V + cols, mask=cm, other=float("-inf"))
                f = f.to(tl.float32) * inv_t
                fm_new = tl.maximum(fm, f)
                fs = fs * tl.exp(fm - fm_new) + tl.exp(f - fm_new)
                fm = fm_new
            else:
                f = x
            upd = cm & (f > best)
            best_idx = tl.where(upd, cols, best_idx)
            best = tl.where(upd, f, best)
        if not FILTERED:
            fm, fs = m, s
        top = tl.max(m, 0)
        ftop = tl.max(fm, 0)
        b = tl.max(best, 0)
        out = stats_ptr + (row * SPLITS + split) * 5
        tl.store(out, top)
        tl.store(out + 1, tl.sum(s * tl.exp(m - top), 0))
        tl.store(out + 2, ftop)
        tl.store(out + 3, tl.sum(fs * tl.exp(fm - ftop), 0))
        tl.store(out + 4, b)
        tl.store(idx_ptr + row * SPLITS + split, tl.min(tl.where(best == b, best_idx, V), 0))

    @triton.jit
    def _sample_pick_kernel(
        logits_ptr,
        filt_ptr,
        V,
        CHUNK,
        temp_ptr,
        seed_ptr,
        step_ptr,
        stats_ptr,
        idx_ptr,
        tok_ptr,
        lp_ptr,
        SPLITS: tl.constexpr,
        GREEDY: tl.constexpr,
        FILTERED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Combine a row's slices and pick: the first highest score (greedy), or a draw by
        inverting the CDF of softmax(score): one uniform per row picks the slice from the
        slices' sums, then a prefix sum over that slice alone finds the token. So only the
        stats pass reads the whole vocabulary, and no per-column random numbers are needed.
        The uniform comes from a counter-based generator keyed by the call's seed and the
        step, so a replayed graph draws fresh numbers every step."""
        row = tl.program_id(0).to(tl.int64)
        inv_t = 1.0 / tl.load(temp_ptr)
        sp = tl.arange(0, SPLITS)
        st = stats_ptr + (row * SPLITS + sp) * 5
        m, s = tl.load(st), tl.load(st + 1)
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
        if GREEDY:
            best = tl.load(st + 4)
            b = tl.max(best, 0)
            pick = tl.min(tl.where(best == b, tl.load(idx_ptr + row * SPLITS + sp), V), 0)
        else:
            fm, fs = tl.load(st + 2), tl.load(st + 3)
            ftop = tl.max(fm, 0)
            w = fs * tl.exp(fm - ftop)
            cum = tl.cumsum(w, 0)
            seed = tl.load(seed_ptr) + tl.load(step_ptr) * 1000003
            target = tl.rand(seed, row.to(tl.int32)) * tl.sum(w, 0)
            last = tl.max(tl.where(w > 0, sp, 0), 0)
            k = tl.minimum(tl.min(tl.where(cum > target, sp, SPLITS), 0), last)
            rest = target - tl.sum(tl.where(sp < k, w, 0.0), 0)
            lane = tl.arange(0, BLOCK)
            run = 0.0
            pick = V
            fallback = 0
            for offset in range(0, CHUNK, BLOCK):
                cols = k * CHUNK + offset + lane
                cm = cols < V
                if FILTERED:
                    f = tl.load(filt_ptr + row * V + cols, mask=cm, other=float("-inf"))
                else:
                    f = tl.load(logits_ptr + row * V + cols, mask=cm, other=float("-inf"))
                e = tl.exp(f.to(tl.float32) * inv_t - ftop)
                c = run + tl.cumsum(e, 0)
                pick = tl.minimum(pick, tl.min(tl.where(cm & (c > rest), cols, V), 0))
                fallback = tl.maximum(fallback, tl.max(tl.where(cm & (e > 0), cols, 0), 0))
                run += tl.sum(e, 0)
            # rounding can leave the draw just past the slice's last token: take that token
            pick = tl.where(pick < V, pick, fallback)
        logit = tl.load(logits_ptr + row * V + pick).to(tl.float32) * inv_t
        tl.store(tok_ptr + row, pick.to(tl.int64))
        tl.store(lp_ptr + row, logit - lse)


# ---- the fused operations, with torch equivalents ---------------------------------------------
class _TritonOps:
    """Launches the kernels above; every buffer is contiguous and preallocated by the engine."""

    def add_rmsnorm(self, x, add, w, out, eps):
        n = x.shape[-1]
        _add_rmsnorm_kernel[(x.shape[0],)](
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
        rep = e.n_heads // e.n_kv
        _rope_decode_attn_kernel[(qkv.shape[0], e.n_kv)](
            qkv,
            e.k_cache[layer],
            e.v_cache[layer],
            e.cos,
            e.sin,
            e.positions,
            e.key_ok,
            e.slot,
            out,
            1.0 / math.sqrt(e.head_dim),
            e.max_len,
            H=e.n_heads,
            KV=e.n_kv,
            D=e.head_dim,
            REP=rep,
            QB=max(16, triton.next_power_of_2(rep)),
            BLOCK_N=ATTN_BLOCK_N,
            IEEE=e.dtype == torch.float32,
            num_warps=ATTN_WARPS,
        )

    def record_and_embed(self, e):
        _record_embed_kernel[(e.rows,)](
            e.sampled, e.sampled_lp, e.finished, e.lengths, e.stop_ids, e.step, e.out_tokens,
            e.out_logprobs, e.tokens, e.embed, e.ln1[0], e.x, e.h, e.pad_id, e.max_len,
            e.hidden, e.eps, NSTOP=MAX_STOP_IDS, BLOCK=triton.next_power_of_2(e.hidden),
        )  # fmt: skip

    def advance(self, e):
        _advance_kernel[(1,)](e.positions, e.slot, e.step, e.rows, e.max_len - 1, BLOCK=1024)

    def silu_mul(self, gu, out):
        ff = out.shape[-1]
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(ff, 1024))](gu, out, ff, BLOCK=1024)

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
        _sample_stats_kernel[(rows, splits)](
            logits, filt, vocab, chunk, e.temperature, e.sample_stats, e.sample_index,
            SPLITS=splits, FILTERED=filtered is not None, BLOCK=block,
        )  # fmt: skip
        _sample_pick_kernel[(rows,)](
            logits, filt, vocab, chunk, e.temperature, e.seed, e.step, e.sample_stats,
            e.sample_index, e.sampled, e.sampled_lp, SPLITS=splits, GREEDY=greedy,
            FILTERED=filtered is not None, BLOCK=block,
        )  # fmt: skip


class _TorchOps:
    """The same operations in plain torch: for the CPU and for checking the kernels."""

    def add_rmsnorm(self, x, add, w, out, eps):
        if add is not None:
            x.add_(add)
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        out.copy_(w * y)

    def rope_attention(self, e, qkv, out, layer):
        r, h, kv, d = qkv.shape[0], e.n_heads, e.n_kv, e.head_dim
        q = qkv[:, : h * d].view(r, h, d)
        k = qkv[:, h * d : (h + kv) * d].view(r, kv, d)
        v = qkv[:, (h + kv) * d :].view(r, kv, d)
        cos = e.cos.index_select(0, e.positions)[:, None, :]
        sin = e.sin.index_select(0, e.positions)[:, None, :]
        q = _rotate(q, cos, sin)
        e.k_cache[layer].index_copy_(2, e.slot, _rotate(k, cos, sin).unsqueeze(2))
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
        out.copy_(F.silu(gu[:, :ff]) * gu[:, ff:])

    def sample(self, e, logits, filtered, greedy):
        x = logits.float() / e.temperature
        lse = torch.logsumexp(x, -1)
        score = x if filtered is None else filtered.float() / e.temperature
        if not greedy:
            noise = torch.empty_like(score).exponential_(generator=e.torch_generator)
            score = score - noise.log()
        tok = score.argmax(-1)
        e.sampled.copy_(tok)
        e.sampled_lp.copy_(x.gather(-1, tok[:, None])[:, 0] - lse)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (..., D) with cos/sin of (..., D/2), computed in fp32 like `apply_rope`."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with the tokens outside top-k / the top-p nucleus set to -inf (as `_pick_tokens`)."""
    filtered = logits.float()
    if top_k and top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        filtered = filtered.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return filtered


# ---- the engine -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Mode:
    """What a captured graph bakes in: greedy or not, and the filters."""

    greedy: bool
    top_k: int
    top_p: float


class DecodeEngine:
    """Weights, KV cache and per-step state for `rows` sequences of up to `max_len` tokens."""

    def __init__(
        self,
        model,
        rows: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        use_triton: bool | None = None,
        use_graphs: bool | None = None,
    ):
        cfg = model.config
        dev = model.device
        self.device, self.rows, self.max_len = dev, rows, max_len
        self.dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else model.dtype)
        if use_triton is None:
            use_triton = HAS_TRITON and (
                dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
            )
        self.ops = _TritonOps() if use_triton else _TorchOps()
        self.use_graphs = (dev.type == "cuda" and use_triton) if use_graphs is None else use_graphs
        self.n_layers, self.n_heads, self.n_kv = (
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        )
        self.head_dim, self.hidden, self.ffn = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
        self.eps, self.vocab = cfg.rms_norm_eps, cfg.vocab_size
        self.qk_norm, self.has_bias = cfg.qk_norm, cfg.attention_bias
        self.pad_id = cfg.pad_token_id or 0
        self.tied = cfg.tie_word_embeddings
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        dt = self.dtype

        def empty(*shape, dtype=dt):
            return torch.empty(*shape, device=dev, dtype=dtype)

        nl = self.n_layers
        # weights (filled by `load_weights` at every call)
        self.embed = empty(self.vocab, self.hidden)
        self.lm_head = self.embed if self.tied else empty(self.vocab, self.hidden)
        self.final_norm = empty(self.hidden)
        self.w_qkv = [empty(qkv_out, self.hidden) for _ in range(nl)]
        self.b_qkv = [empty(qkv_out) if self.has_bias else None for _ in range(nl)]
        self.w_o = [empty(self.hidden, self.n_heads * self.head_dim) for _ in range(nl)]
        self.w_gu = [empty(2 * self.ffn, self.hidden) for _ in range(nl)]
        self.w_down = [empty(self.hidden, self.ffn) for _ in range(nl)]
        self.ln1 = [empty(self.hidden) for _ in range(nl)]
        self.ln2 = [empty(self.hidden) for _ in range(nl)]
        self.q_norm = [empty(self.head_dim) for _ in range(nl)] if self.qk_norm else None
        self.k_norm = [empty(self.head_dim) for _ in range(nl)] if self.qk_norm else None
        # rotary table for every position the cache can hold
        freqs = torch.arange(max_len, device=dev).float()[:, None] * model.inv_freq[None, :]
        self.cos, self.sin = freqs.cos().contiguous(), freqs.sin().contiguous()
        # KV cache and the state one step reads and writes
        kv_shape = (rows, self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(kv_shape, device=dev, dtype=dt) for _ in range(nl)]
        self.v_cache = [torch.zeros(kv_shape, device=dev, dtype=dt) for _ in range(nl)]
        self.key_ok = torch.zeros(rows, max_len, device=dev, dtype=torch.bool)
        self.h_last = torch.zeros(rows, self.hidden, device=dev, dtype=dt)  # final-normed
        self.tokens = torch.zeros(rows, device=dev, dtype=torch.long)
        self.positions = torch.zeros(rows, device=dev, dtype=torch.long)
        self.slot = torch.zeros(1, device=dev, dtype=torch.long)
        self.step = torch.zeros(1, device=dev, dtype=torch.long)
        self.seed = torch.zeros(1, device=dev, dtype=torch.long)
        self.temperature = torch.ones(1, device=dev, dtype=torch.float32)
        self.finished = torch.zeros(rows, device=dev, dtype=torch.bool)
        self.lengths = torch.zeros(rows, device=dev, dtype=torch.long)
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, device=dev, dtype=torch.long)
        self.sampled = torch.zeros(rows, device=dev, dtype=torch.long)
        self.sampled_lp = torch.zeros(rows, device=dev, dtype=torch.float32)
        self.out_tokens = torch.zeros(rows, max_len, device=dev, dtype=torch.long)
        self.out_logprobs = torch.zeros(rows, max_len, device=dev, dtype=torch.float32)
        self.torch_generator = torch.Generator(device=dev)
        # activations of one step
        self.x = empty(rows, self.hidden)
        self.h = empty(rows, self.hidden)
        self.sample_stats = self.sample_index = None  # the sampler's per-slice results
        self.attn = empty(rows, self.n_heads * self.head_dim)
        self.act = empty(rows, self.ffn)
        self.graphs: dict[_Mode, torch.cuda.CUDAGraph] = {}
        self.pool = None

    # ---- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, model) -> None:
        """Copy the model's current weights in (they change between GRPO steps)."""
        m = model.model
        self.embed.copy_(m.embed_tokens.weight)
        if not self.tied:
            self.lm_head.copy_(model.lm_head.weight)
        self.final_norm.copy_(m.norm.weight)
        hd = self.n_heads * self.head_dim
        kd = self.n_kv * self.head_dim
        for i, layer in enumerate(m.layers):
            a, mlp = layer.self_attn, layer.mlp
            self.w_qkv[i][:hd].copy_(a.q_proj.weight)
            self.w_qkv[i][hd : hd + kd].copy_(a.k_proj.weight)
            self.w_qkv[i][hd + kd :].copy_(a.v_proj.weight)
            if self.has_bias:
                self.b_qkv[i][:hd].copy_(a.q_proj.bias)
                self.b_qkv[i][hd : hd + kd].copy_(a.k_proj.bias)
                self.b_qkv[i][hd + kd :].copy_(a.v_proj.bias)
            self.w_o[i].copy_(a.o_proj.weight)
            self.w_gu[i][: self.ffn].copy_(mlp.gate_proj.weight)
            self.w_gu[i][self.ffn :].copy_(mlp.up_proj.weight)
            self.w_down[i].copy_(mlp.down_proj.weight)
            self.ln1[i].copy_(layer.input_layernorm.weight)
            self.ln2[i].copy_(layer.post_attention_layernorm.weight)
            if self.qk_norm:
                self.q_norm[i].copy_(a.q_norm.weight)
                self.k_norm[i].copy_(a.k_norm.weight)

    # ---- prefill ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int) -> None:
        """Run the prompts once, write their KV to the rows of their group, set the step state.

        Rows past len(prompts) * n are idle: finished from the start and never read.
        """
        p, w = ids.shape
        rows = p * n
        valid = mask.bool()
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]
        causal = torch.ones(w, w, dtype=torch.bool, device=ids.device).tril()
        attn_mask = causal[None] & valid[:, None, :]
        attn_mask |= torch.eye(w, dtype=torch.bool, device=ids.device)[None]
        attn_mask = attn_mask[:, None]
        h_dim, kd = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        rep = self.n_heads // self.n_kv
        x = F.embedding(ids, self.embed)
        for i in range(self.n_layers):
            h = _rms(x, self.ln1[i], self.eps)
            qkv = F.linear(h, self.w_qkv[i], self.b_qkv[i])
            q = qkv[..., :h_dim].view(p, w, self.n_heads, self.head_dim)
            k = qkv[..., h_dim : h_dim + kd].view(p, w, self.n_kv, self.head_dim)
            v = qkv[..., h_dim + kd :].view(p, w, self.n_kv, self.head_dim)
            if self.qk_norm:
                q, k = _rms(q, self.q_norm[i], self.eps), _rms(k, self.k_norm[i], self.eps)
            q, k = _rotate(q, cos, sin).transpose(1, 2), _rotate(k, cos, sin).transpose(1, 2)
            v = v.transpose(1, 2)
            self.k_cache[i][:rows, :, :w] = k.repeat_interleave(n, dim=0)
            self.v_cache[i][:rows, :, :w] = v.repeat_interleave(n, dim=0)
            out = F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=attn_mask
            )
            x = x + F.linear(out.transpose(1, 2).reshape(p, w, -1), self.w_o[i])
            h = _rms(x, self.ln2[i], self.eps)
            gu = F.linear(h, self.w_gu[i])
            x = x + F.linear(F.silu(gu[..., : self.ffn]) * gu[..., self.ffn :], self.w_down[i])
        last = _rms(x[:, -1], self.final_norm, self.eps)
        # step state: slots >= w hold generated tokens and are always valid keys
        self.key_ok.fill_(True)
        self.key_ok[:rows, :w] = valid.repeat_interleave(n, dim=0)
        self.key_ok[rows:, :w] = False
        self.h_last.zero_()
        self.h_last[:rows] = last.repeat_interleave(n, dim=0)
        self.positions.zero_()
        self.positions[:rows] = valid.long().sum(1).repeat_interleave(n, dim=0)
        self.tokens.fill_(self.pad_id)
        self.slot.fill_(w)
        self.step.zero_()
        self.finished.fill_(True)
        self.finished[:rows] = False
        self.lengths.zero_()

    # ---- one decode step -------------------------------------------------------------------
    def _step(self, mode: _Mode) -> None:
        """Pick a token from h_last, record it, then run it through the model into h_last."""
        ops = self.ops
        logits = F.linear(self.h_last, self.lm_head)
        filtered = None
        if not mode.greedy and (mode.top_k or mode.top_p < 1.0):
            filtered = _filter_logits(logits, mode.top_k, mode.top_p)
        ops.sample(self, logits, filtered, mode.greedy)
        ops.record_and_embed(self)  # then the forward of the new token
        for i in range(self.n_layers):
            qkv = F.linear(self.h, self.w_qkv[i], self.b_qkv[i])
            if self.qk_norm:
                self._qk_norm(qkv, i)
            ops.rope_attention(self, qkv, self.attn, i)
            ops.add_rmsnorm(self.x, F.linear(self.attn, self.w_o[i]), self.ln2[i], self.h, self.eps)
            ops.silu_mul(F.linear(self.h, self.w_gu[i]), self.act)
            nxt = self.ln1[i + 1] if i + 1 < self.n_layers else self.final_norm
            out = self.h_last if i + 1 == self.n_layers else self.h
            ops.add_rmsnorm(self.x, F.linear(self.act, self.w_down[i]), nxt, out, self.eps)
        ops.advance(self)

    def _qk_norm(self, qkv: torch.Tensor, i: int) -> None:
        r, hd, kd = qkv.shape[0], self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q = qkv[:, :hd].view(r, self.n_heads, self.head_dim)
        k = qkv[:, hd : hd + kd].view(r, self.n_kv, self.head_dim)
        q.copy_(_rms(q, self.q_norm[i], self.eps))
        k.copy_(_rms(k, self.k_norm[i], self.eps))

    def _graph(self, mode: _Mode) -> torch.cuda.CUDAGraph:
        """Capture the step once per mode; the state it mutates is reset by `prefill`."""
        if mode in self.graphs:
            return self.graphs[mode]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile the kernels, set up cuBLAS, outside the capture
                self._step(mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(mode)
        self.pool = graph.pool()
        self.graphs[mode] = graph
        return graph

    # ---- a whole call ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams, stop_ids: set[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Token ids and log-probs of every row (n per prompt, grouped), stop token included."""
        max_new = params.max_new_tokens
        greedy = params.temperature == 0
        mode = _Mode(greedy, 0 if greedy else params.top_k, 1.0 if greedy else params.top_p)
        self.stop_ids.fill_(-1)
        if stop_ids:
            self.stop_ids[: len(stop_ids)] = torch.tensor(sorted(stop_ids), device=self.device)
        self.temperature.fill_(1.0 if greedy else params.temperature)
        seed = params.seed if params.seed is not None else int(torch.randint(2**31, (1,)))
        self.seed.fill_(seed)
        self.torch_generator.manual_seed(seed)
        graph = self._graph(mode) if self.use_graphs else None
        timer = _Timer(self.device)
        self.prefill(ids, mask, params.n)
        timer.mark("prefill")
        steps = 0
        for steps in range(1, max_new + 1):
            if graph is not None:
                graph.replay()
            else:
                self._step(mode)
            if steps < max_new and steps % CHECK_EVERY == 0 and bool(self.finished.all()):
                break
        timer.mark("decode")
        rows = ids.shape[0] * params.n
        lengths = torch.where(self.lengths[:rows] > 0, self.lengths[:rows], steps)
        lengths = lengths.clamp(max=steps).tolist()
        tokens = self.out_tokens[:rows, :steps].tolist()
        logprobs = self.out_logprobs[:rows, :steps].tolist()
        _LAST_STATS.update(
            prefill_ms=timer.ms("prefill"),
            decode_ms=timer.ms("decode"),
            decode_steps=steps,
            rows=rows,
            prompt_width=ids.shape[1],
            ms_per_step=timer.ms("decode") / max(steps, 1),
        )
        return (
            [t[:n] for t, n in zip(tokens, lengths)],
            [lp[:n] for lp, n in zip(logprobs, lengths)],
        )


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _Timer:
    """Milliseconds between marks: CUDA events on the GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        import time

        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.marks.append((name, self._now()))

    def ms(self, name: str) -> float:
        idx = [n for n, _ in self.marks].index(name)
        a, b = self.marks[idx - 1][1], self.marks[idx][1]
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1000.0


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
    **engine_kwargs,
) -> list[Completion]:
    """`sample()` on the engine: same arguments, same results (up to floating-point rounding).

    Stop strings are honoured after decoding: a row that produced one is cut at the first
    token where its text contains it, exactly where the reference sampler would have
    stopped; only stop tokens end a row early on the GPU.
    """
    params = params or SamplingParams()
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("sample() needs at least one prompt, and every prompt needs a token")
    per_chunk = len(prompt_ids) if not max_batch_size else max(1, max_batch_size // params.n)
    stop_ids = _stop_ids(model, tokenizer, params)
    checker = _StopChecker(stop_ids, params.stop_strings, tokenizer)
    width = max(len(p) for p in prompt_ids)
    rows = min(len(prompt_ids), per_chunk) * params.n
    engine = get_engine(model, rows, width + params.max_new_tokens, **engine_kwargs)
    engine.load_weights(model)
    out: list[Completion] = []
    for start in range(0, len(prompt_ids), per_chunk):
        chunk = prompt_ids[start : start + per_chunk]
        ids, mask = _left_pad(chunk, engine.pad_id, model.device)
        tokens, logprobs = engine.generate(ids, mask, params, stop_ids)
        for row, (t, lp) in enumerate(zip(tokens, logprobs)):
            if params.stop_strings:
                cut = _stop_string_cut(t, checker)
                t, lp = t[:cut], lp[:cut]
            out.append(checker.finish(start + row // params.n, t, lp))
    return out


def _stop_string_cut(ids: list[int], checker: _StopChecker) -> int:
    """Length of the shortest prefix whose text holds a stop string (all of ids if none)."""
    if not ids or not checker._has_stop_string(ids):
        return len(ids)
    lo, hi = 1, len(ids)  # the prefix of length hi holds one; find the shortest
    while lo < hi:
        mid = (lo + hi) // 2
        if checker._has_stop_string(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return hi
