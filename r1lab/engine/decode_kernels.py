"""The decode engine's Triton kernels: one decode step's fused operations on the GPU.

Each kernel fuses what would be several eager launches at the GRPO decode shape (hundreds
of rows, one new token each): residual add + RMSNorm; RoPE + the KV-cache write +
grouped-query attention, in one pass over the cache or split over it (flash decoding: more
programs to stream the cache, then a kernel that combines their partial softmaxes); SiLU *
up; sampling in two passes over the vocabulary; recording the pick and embedding the next
input; advancing the step state. `decode_ops.TritonOps` launches them (launch shapes live
there); `decode_ops.TorchOps` is the same step in plain torch, the reference they are
checked against. Only kernels here: no launch logic, no state.

Importable without Triton (the CPU build of torch has none): `HAS_TRITON` says whether the
kernels exist.
"""

from __future__ import annotations

try:  # Triton ships with CUDA builds of torch; the CPU build has none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False


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
    def add_rmsnorm_kernel(
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
    def rope_decode_attn_kernel(
        qkv_ptr,
        kc_ptr,
        vc_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        ok_ptr,
        slot_ptr,
        out_ptr,
        part_m_ptr,
        part_l_ptr,
        part_acc_ptr,
        scale,
        L,
        H: tl.constexpr,
        KV: tl.constexpr,
        D: tl.constexpr,
        REP: tl.constexpr,
        QB: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One row, one KV head, one split of the cache: RoPE, the new key and value into
        the cache, then attention over the split's keys.

        The REP query heads that share a KV head are the rows of one small matrix, so the
        cached keys and values are read once for all of them and never expanded. Rotated
        vectors stay as two halves (dot products add the halves), so nothing is re-joined.
        The new token's key is used from registers, not read back from the cache, so the
        cache write needs no barrier; the cached keys are slots 0 .. slot - 1.

        SPLIT_KEYS == 0: one split (grid axis 2 of size 1) over all the cached keys, and the
        output is written here. Otherwise split s takes the cached keys [s * SPLIT_KEYS,
        (s + 1) * SPLIT_KEYS) below slot and writes its partial softmax (running max m,
        sum l, unnormalised fp32 acc) for `attn_combine_kernel`; splits past the cache's
        end return at once. Split 0 alone writes the new key and value into the cache at
        `slot` and counts the new token as a key, so no program reads the slot being
        written. Every split rotates the query itself: that is cheaper than a launch.
        """
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(slot_ptr)
        if SPLIT_KEYS == 0:
            lo = 0
            hi = slot
        else:
            lo = split.to(tl.int64) * SPLIT_KEYS
            hi = tl.minimum(lo + SPLIT_KEYS, slot)
            if split > 0 and lo >= slot:
                return
        first = split == 0
        half = tl.arange(0, D // 2)
        d = tl.arange(0, D)
        qi = tl.arange(0, QB)
        qmask = qi < REP
        stride = (H + 2 * KV) * D
        pos = tl.load(pos_ptr + row)
        cos = tl.load(cos_ptr + pos * (D // 2) + half)
        sin = tl.load(sin_ptr + pos * (D // 2) + half)
        dt = kc_ptr.dtype.element_ty
        # the new key (rotated, rounded as the cache holds it) and value
        k_src = qkv_ptr + row * stride + (H + kvh) * D
        k1 = tl.load(k_src + half).to(tl.float32)
        k2 = tl.load(k_src + D // 2 + half).to(tl.float32)
        k1, k2 = (k1 * cos - k2 * sin).to(dt), (k2 * cos + k1 * sin).to(dt)
        v_new = tl.load(qkv_ptr + row * stride + (H + KV + kvh) * D + d)
        base = (row * KV + kvh) * L * D
        if first:  # into the cache, by one split only
            tl.store(kc_ptr + base + slot * D + half, k1)
            tl.store(kc_ptr + base + slot * D + D // 2 + half, k2)
            tl.store(vc_ptr + base + slot * D + d, v_new)
        # the REP query heads, rotated, as two (QB, D/2) halves
        q_src = qkv_ptr + row * stride + (kvh * REP + qi[:, None]) * D
        q1 = tl.load(q_src + half[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_src + D // 2 + half[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
        q1, q2 = (q1 * cos - q2 * sin).to(dt), (q2 * cos + q1 * sin).to(dt)
        # split 0 starts from the new token (every row's own token is a valid key); the
        # others from nothing, with a finite max so a split whose keys are all masked out
        # stays 0 instead of NaN (exp(-inf - -inf))
        s_new = (
            tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], 1)
            + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], 1)
        ) * scale
        m_i = tl.where(first, s_new, -1.0e30)
        l_i = tl.zeros([QB], dtype=tl.float32) + tl.where(first, 1.0, 0.0)
        acc = (
            tl.zeros([QB, D], dtype=tl.float32)
            + tl.where(first, v_new.to(tl.float32), 0.0)[None, :]
        )
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            in_range = j < hi
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
        if SPLIT_KEYS == 0:
            out = acc / l_i[:, None]
            o_off = (row * H + kvh * REP + qi[:, None]) * D + d[None, :]
            tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=qmask[:, None])
        else:
            part = ((row * KV + kvh) * tl.num_programs(2) + split) * QB + qi
            tl.store(part_m_ptr + part, m_i, mask=qmask)
            tl.store(part_l_ptr + part, l_i, mask=qmask)
            tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=qmask[:, None])

    @triton.jit
    def attn_combine_kernel(
        part_m_ptr,
        part_l_ptr,
        part_acc_ptr,
        slot_ptr,
        out_ptr,
        SPLITS,
        H: tl.constexpr,
        KV: tl.constexpr,
        D: tl.constexpr,
        REP: tl.constexpr,
        QB: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
        SPLITS_P2: tl.constexpr,
    ):
        """One row, one KV head: merge the partials of the splits that hold keys (split 0,
        with the new token, at least), each rescaled to the largest max, into the output."""
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        d = tl.arange(0, D)
        qi = tl.arange(0, QB)
        qmask = qi < REP
        n = tl.maximum((tl.load(slot_ptr) + SPLIT_KEYS - 1) // SPLIT_KEYS, 1)
        base = (row * KV + kvh) * SPLITS  # the first partial of this row and head
        sp = tl.arange(0, SPLITS_P2)
        idx = (base + sp[:, None]) * QB + qi[None, :]
        live = (sp < n)[:, None] & qmask[None, :]
        m = tl.load(part_m_ptr + idx, mask=live, other=float("-inf"))
        top = tl.where(qmask, tl.max(m, 0), 0.0)  # padding rows of the query block: no partials
        denom = tl.sum(tl.load(part_l_ptr + idx, mask=live, other=0.0) * tl.exp(m - top), 0)
        acc = tl.zeros([QB, D], dtype=tl.float32)
        for s in range(0, n):
            part = (base + s) * QB + qi
            w = tl.exp(tl.load(part_m_ptr + part, mask=qmask, other=0.0) - top)
            a = tl.load(
                part_acc_ptr + part[:, None] * D + d[None, :], mask=qmask[:, None], other=0.0
            )
            acc += a * w[:, None]
        out = acc / denom[:, None]
        o_off = (row * H + kvh * REP + qi[:, None]) * D + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=qmask[:, None])

    @triton.jit
    def record_embed_kernel(
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
    def advance_kernel(pos_ptr, slot_ptr, step_ptr, rows, last, BLOCK: tl.constexpr):
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
    def silu_mul_kernel(gu_ptr, out_ptr, FF, BLOCK: tl.constexpr):
        """out = silu(gate) * up from the fused gate|up projection, rounded as torch does."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < FF
        g = tl.load(gu_ptr + row * 2 * FF + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * FF + FF + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * FF + cols, (s * u).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def sample_stats_kernel(
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
    def _mul32(x, c):
        """(x * c) mod 2^32 in int64 without overflow, as `sampling._mul32`."""
        high = (((x >> 16) * c) & 0xFFFF) << 16
        return (high + (x & 0xFFFF) * c) & 0xFFFFFFFF

    @triton.jit
    def _mix32(x):
        """`sampling._mix32`: the lowbias32 hash on an int64 holding 32 bits."""
        x = x ^ (x >> 16)
        x = _mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _mul32(x, 0x846CA68B)
        return x ^ (x >> 16)

    @triton.jit
    def _uniform(key, position):
        """`sampling.uniforms` for one row: the same 24 bits, the same fp32 value."""
        h = _mix32((position & 0xFFFFFFFF) ^ 0x9E3779B9)
        h = _mix32(h ^ (key & 0xFFFFFFFF))
        h = _mix32(h ^ (key >> 32))
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def sample_pick_kernel(
        logits_ptr,
        filt_ptr,
        V,
        CHUNK,
        temp_ptr,
        keys_ptr,
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
        The uniform is `sampling.uniforms` of the row's key and the step, computed here, so
        a row draws the same numbers whatever rows share its batch (and as the torch ops
        and the reference sampler do), and a replayed graph draws fresh ones."""
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
            u = _uniform(tl.load(keys_ptr + row), tl.load(step_ptr))
            target = u * tl.sum(w, 0)
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
