"""Log-probs of chosen tokens through the LM head, chunk by chunk, with Triton on CUDA.

`chunked_logprobs(hidden, weight, targets)` never holds a (tokens x vocabulary) tensor
longer than one chunk: the forward keeps each row's log-sum-exp, the backward recomputes a
chunk's logits and turns them in place into the gradient. On CUDA each chunk's softmax
work is one Triton pass; elsewhere (or when a kernel fails to build) torch ops do it, and
the decline is reported once (`report_decline`, through r1lab.engine.fallbacks).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from r1lab.engine import fallbacks
from r1lab.engine.logprobs import entropy_from_logits

try:  # Triton ships with CUDA builds of torch; the CPU build has none.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False

_EXPECTED: set[tuple[str, str]] = set()


def report_decline(path: str, reason: str, expected: bool = False) -> None:
    """Say once per reason that a fast path is not taken, and why (r1lab.engine.fallbacks).

    `expected` declines (no GPU: the CPU runs the reference paths by design) are logged at
    info level and not counted; on a GPU a decline costs speed, so it is a warning.
    """
    if not expected:
        fallbacks.declined(path, reason)
    elif (path, reason) not in _EXPECTED:
        _EXPECTED.add((path, reason))
        fallbacks.log.info("%s: not used: %s", path, reason)


if HAS_TRITON:

    @triton.jit
    def _lse_pick_kernel(
        logits_ptr, tgt_ptr, inv_t, lse_ptr, pick_ptr, ent_ptr, V, BLOCK: tl.constexpr,
        ENTROPY: tl.constexpr,
    ):  # fmt: skip
        """One row: log-sum-exp of logits * inv_t (fp32), the target's scaled logit and, if
        asked, the entropy lse - E[x] (E[x] kept as a running sum rescaled like the lse)."""
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        t = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + lane
            x = tl.load(logits_ptr + row * V + cols, mask=cols < V, other=float("-inf"))
            x = x.to(tl.float32) * inv_t
            m_new = tl.maximum(m, x)
            scale = tl.exp(m - m_new)
            e = tl.exp(x - m_new)
            s = s * scale + e
            if ENTROPY:
                t = t * scale + tl.where(cols < V, e * x, 0.0)
            m = m_new
        top = tl.max(m, 0)
        w = tl.exp(m - top)
        total = tl.sum(s * w, 0)
        lse = top + tl.log(total)
        tl.store(lse_ptr + row, lse)
        if ENTROPY:
            tl.store(ent_ptr + row, lse - tl.sum(t * w, 0) / total)
        tgt = tl.load(tgt_ptr + row)
        tl.store(pick_ptr + row, tl.load(logits_ptr + row * V + tgt).to(tl.float32) * inv_t)

    @triton.jit
    def _softmax_grad_kernel(logits_ptr, lse_ptr, g_ptr, tgt_ptr, inv_t, V, BLOCK: tl.constexpr):
        """In place: logits -> d logprob / d logits * g = (onehot - softmax) * g * inv_t."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cm = cols < V
        ptr = logits_ptr + row * V + cols
        x = tl.load(ptr, mask=cm, other=0.0).to(tl.float32) * inv_t
        g = tl.load(g_ptr + row) * inv_t
        p = tl.exp(x - tl.load(lse_ptr + row))
        d = tl.where(cols == tl.load(tgt_ptr + row), g - p * g, -p * g)
        tl.store(ptr, d.to(logits_ptr.dtype.element_ty), mask=cm)


_KERNELS_BROKEN: list[str] = []


def _use_kernels(t: torch.Tensor) -> bool:
    """Triton for the softmax passes on CUDA, unless a launch has failed before."""
    on = t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if HAS_TRITON and on and not _KERNELS_BROKEN:
        return True
    if not on:
        report_decline(
            "Triton LM-head kernels", f"device is {t.device.type}; torch ops", expected=True
        )
    elif not HAS_TRITON:
        report_decline("Triton LM-head kernels", "triton is not installed; torch ops")
    return False


def _kernel_failed(err: Exception) -> None:
    """Remember that the kernels do not build here; the torch path takes over."""
    _KERNELS_BROKEN.append(repr(err))
    report_decline("Triton LM-head kernels", f"a launch failed ({repr(err)[:200]}); torch ops")


def _chunk_forward(hc, w, targets, temperature, entropy: bool = False):
    """(log-sum-exp, picked scaled logit, entropy or None) of one chunk of rows, all fp32."""
    logits = F.linear(hc, w)
    if _use_kernels(logits):
        rows, vocab = logits.shape
        lse = torch.empty(rows, device=hc.device, dtype=torch.float32)
        pick, ent = torch.empty_like(lse), torch.empty_like(lse) if entropy else None
        try:
            _lse_pick_kernel[(rows,)](
                logits, targets, 1.0 / temperature, lse, pick, ent if entropy else lse, vocab,
                BLOCK=2048, ENTROPY=entropy, num_warps=8,
            )  # fmt: skip
            return lse, pick, ent
        except Exception as err:  # noqa: BLE001 - a kernel that does not build here
            _kernel_failed(err)
    ent = entropy_from_logits(logits, temperature) if entropy else None
    logits = logits.float()
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.logsumexp(logits, -1), logits.gather(1, targets[:, None])[:, 0], ent


def _chunk_grad_logits(hc, w, targets, lse, g, temperature):
    """d(sum_i g_i * logprob_i) / d logits for one chunk, in the compute dtype."""
    logits = F.linear(hc, w)
    if _use_kernels(logits):
        rows, vocab = logits.shape
        try:
            _softmax_grad_kernel[(rows, triton.cdiv(vocab, 4096))](
                logits, lse, g, targets, 1.0 / temperature, vocab, BLOCK=4096, num_warps=8
            )
            return logits
        except Exception as err:  # noqa: BLE001 - a kernel that does not build here
            _kernel_failed(err)
    p = logits.float()
    if temperature != 1.0:
        p.div_(temperature)
    p.sub_(lse[:, None]).exp_()
    gs = (g / temperature)[:, None]
    p.mul_(-gs).scatter_add_(1, targets[:, None], gs)
    return p.to(hc.dtype)


_ACCUMULATE_WAY: list[str] = []


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with a, b in the compute dtype.

    On CUDA an fp32-output matmul accumulates straight into `acc` where this torch has
    one (`out_dtype`); otherwise the product is formed in the compute dtype and added.
    """
    ways = ["out_dtype", "plain"] if acc.is_cuda and acc.dtype != a.dtype else ["plain"]
    if _ACCUMULATE_WAY and _ACCUMULATE_WAY[0] in ways:
        ways = _ACCUMULATE_WAY[:1]
    for way in ways:
        try:
            if way == "out_dtype":
                acc += torch.mm(a, b, out_dtype=acc.dtype)
            else:
                acc += (a @ b).to(acc.dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            continue
        if not _ACCUMULATE_WAY and acc.is_cuda:
            _ACCUMULATE_WAY.append(way)
        return
    raise RuntimeError("no way to accumulate the LM-head gradient")


class _ChunkedLogprobs(torch.autograd.Function):
    """log softmax(h @ W.T / T)[target] for every row of h, one chunk of rows at a time.

    Saves only the inputs and each row's log-sum-exp; the backward recomputes a chunk's
    logits, turns them in place into (onehot - softmax) * grad / T, and multiplies back
    into the gradients of h and W (W's only when it needs one: a frozen head, as under
    LoRA, costs neither the (V, d) fp32 accumulator nor its matmuls). Peak extra memory is one chunk's logits, not the
    batch's; on CUDA each chunk's softmax work is one Triton pass over its logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, compute_dtype, entropy):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        ent = torch.zeros_like(out)  # a diagnostic: no gradient flows through it
        for s in range(0, h.shape[0], chunk_size):
            e = s + chunk_size
            lse[s:e], pick, chunk_ent = _chunk_forward(
                h[s:e], w, targets[s:e], temperature, entropy
            )
            out[s:e] = pick - lse[s:e]
            if entropy:
                ent[s:e] = chunk_ent
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size, ctx.compute_dtype = temperature, chunk_size, compute_dtype
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        cd, temp, chunk = ctx.compute_dtype, ctx.temperature, ctx.chunk_size
        h, w = hidden.to(cd), weight.to(cd)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        grad_out = grad_out.float().contiguous()
        for s in range(0, h.shape[0], chunk):
            e = s + chunk
            d = _chunk_grad_logits(h[s:e], w, targets[s:e], lse[s:e], grad_out[s:e], temp)
            if grad_h is not None:
                torch.mm(d, w, out=grad_h[s:e])
            if grad_w is not None:
                _accumulate(grad_w, d.t(), h[s:e])
            del d
        grad_h = grad_h.to(hidden.dtype) if grad_h is not None else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
):
    """Token log-probs (M,) fp32 from hidden states (M, d) and the LM head weight (V, d).

    Matmuls run in the autocast dtype when autocast is on (else in the inputs' dtype);
    softmax statistics are fp32. `with_entropy` also returns each row's entropy of
    softmax(logits / T), (M,) fp32 without gradient, from the same pass over the logits.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(dev, enabled=False):
        logprobs, entropy = _ChunkedLogprobs.apply(
            hidden, weight, targets, float(temperature), int(chunk_size), compute_dtype,
            with_entropy,
        )  # fmt: skip
    return (logprobs, entropy) if with_entropy else logprobs
