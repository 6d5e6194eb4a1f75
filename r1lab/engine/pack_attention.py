"""Attention over a pack: document-causal attention for sequences laid end to end.

FlashAttention's varlen kernel (`torch.nn.attention.varlen`) on CUDA in fp16/bf16, so
attention never crosses a sequence boundary and no mask is built; its call is read off the
installed torch's signature and checked once, forward and backward, against a padded SDPA
path that runs anywhere (`_attention_options` picks one and says why when it declines).
The packed training pass (`r1lab.engine.fast_train`) calls these inside its layer function.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from r1lab.engine.lm_head import report_decline

ATTENTION_BACKENDS = ("auto", "varlen", "sdpa")


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
        report_decline(
            "varlen attention", f"torch {torch.__version__} has no varlen_attn; padded SDPA"
        )
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    tries = [causal, {**causal, "repeat_kv": True}]
    failures = []
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
                # relative to each tensor's size: at head_dim 128 the gradients reach tens,
                # where one bf16 rounding step is 0.125, so an absolute bound would reject
                # a correct call (it did, at the 1.5B shape)
                pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(xs, ref_in)]
                err = max(((a - b).float().norm() / b.float().norm()).item() for a, b in pairs)
                if err < 2e-2:
                    _VARLEN_OK[key] = options
                    return options
                failures.append(f"{options}: relative error {err:.3g}")
            except Exception as exc:  # noqa: BLE001 - any failure means: not this way
                failures.append(f"{options}: {type(exc).__name__}: {str(exc)[:120]}")
    report_decline(
        "varlen attention",
        f"no call of varlen_attn matched the padded path ({'; '.join(failures)}); padded SDPA",
    )
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


def _attention_options(backend: str, model) -> dict | None:
    """The varlen call options for this model and dtype, or None for the padded path."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    dev = model.device
    autocast = torch.is_autocast_enabled(dev.type)
    dtype = torch.get_autocast_dtype(dev.type) if autocast else model.dtype
    if backend == "sdpa" or dtype not in (torch.float16, torch.bfloat16) or dev.type != "cuda":
        if backend == "varlen":
            raise RuntimeError("varlen attention is not usable here (needs CUDA and fp16/bf16)")
        if backend == "auto" and dev.type != "cuda":
            report_decline("varlen attention", f"device is {dev.type}; padded SDPA", expected=True)
        elif backend == "auto":
            report_decline(
                "varlen attention", f"compute dtype {dtype} (needs fp16/bf16); padded SDPA"
            )
        return None
    cfg = model.config
    options = _varlen_options(
        dev, dtype, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    )
    if options is None and backend == "varlen":
        raise RuntimeError("varlen attention failed its check against the padded path")
    return options
