"""The fast training path for RL on rollouts: packed sequences, bf16 compute, chunked log-probs.

Why: a GRPO batch is hundreds of prompt + completion sequences of uneven length. Padding
them to one width wastes compute on pad tokens, the dense attention mask that padding
needs keeps attention off the fast kernels, and the full-vocabulary fp32 logits of a
batch (tokens x 150k x 4 bytes) dwarf the model. Here:

- `pack_rollouts` lays the sequences end to end with no padding, in micro-batches of at
  most `max_tokens` tokens; positions restart at 0 for every sequence;
- the decoder runs over a pack with a document-causal attention (FlashAttention's varlen
  kernel through `torch.nn.attention.varlen` on CUDA, so attention never crosses a
  sequence boundary and no mask is built); a padded SDPA fallback runs anywhere
  (`r1lab.engine.pack_attention`);
- the model's own modules do the rest, so gradients land on its parameters; with fp32
  master weights the forward runs under bf16 autocast (the optimizer, e.g. fused AdamW,
  updates the fp32 weights);
- log-probs of the completion tokens come from the LM head in chunks of positions through
  a custom autograd function that keeps only each chunk's log-sum-exp and recomputes the
  chunk's logits in the backward, so no (tokens x vocab) tensor outlives a chunk;
- each decoder layer can be checkpointed (recomputed in the backward) to bound memory;
- LoRA layers (`r1lab.model.lora`) add their low-rank update `(alpha / r) B A dropout(h)`
  beside the frozen weight's matmul, as their module does, so gradients reach the adapters
  only and no merged weight is formed;
- `r1lab.engine.grpo_update` runs the policy, old-policy and reference passes of GRPO
  through `packed_logprobs`, so all three are batched the same way;
- under FSDP2 the pass runs as the model's forward and each layer's as that layer's
  (`run_with_weights`, registered by `r1lab.distributed.shard_model`), so each unit's
  weights are gathered for its call and its gradients reduced after, as for `forward`.

A fast path that declines (varlen attention, the compiled layer, the Triton kernels) says
so once per reason through `r1lab.engine.fallbacks`, so a slow run is never silent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from r1lab.engine.lm_head import chunked_logprobs, report_decline
from r1lab.engine.pack_attention import _attention_options, _padded_attention, _varlen_call
from r1lab.model.lora import LoraLinear
from r1lab.model.transformer import rope_tables


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
            f.name: host_to_device(getattr(self, f.name), device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return PackedBatch(**moved)


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`, without making the host wait for the device's queued work.

    A copy from pageable host memory to a GPU waits for every kernel already queued on the
    stream (CUDA's documented behaviour for pageable transfers), so a training loop that
    copies each micro-batch's indices that way can never run ahead of the GPU: the GPU
    idles while the host builds and launches the next micro-batch. Staged in pinned
    memory the copy is queued like a kernel (torch's pinned allocator keeps the staging
    buffer until the copy is done). Elsewhere a plain copy.
    """
    if device is None:
        return t
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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

    def t(x, dtype=torch.long):  # built on the host, copied without waiting for the device
        return host_to_device(torch.tensor(x, dtype=dtype), device)

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


# ---- the decoder over a pack -------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as the model's module computes it (fp32 statistics)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (T, heads, D) with cos/sin (T, 1, D/2), in fp32 as the model's `apply_rope`."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _make_layer_fn(cfg, attn_options: dict | None, lora: tuple[float, float] | None = None):
    """A decoder layer as a function of tensors only (the layer's weights are arguments).

    Taking no module keeps one compiled graph valid for every layer. q/k/v and gate/up
    are each one matmul over the concatenated weights (their gradients split back to the
    separate parameters through the concatenation); the math is the model's.

    `lora` = (scale, dropout): the function takes 14 more arguments, (A, B) of q, k, v, o,
    gate, up and down (`_layer_adapters`; None where a projection has none), and adds
    scale * B A dropout(input) to each adapted projection's output, as `LoraLinear` does.
    """
    eps, heads, kv, hd = (
        cfg.rms_norm_eps,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    qk_norm, has_bias = cfg.qk_norm, cfg.attention_bias
    scale, p_drop = lora or (0.0, 0.0)

    def plus(y, h, a, b):
        """y plus the projection's low-rank update (y itself without an adapter)."""
        if a is None:
            return y
        h = F.dropout(h, p_drop, training=True) if p_drop else h
        return y + F.linear(F.linear(h, a), b) * scale

    def layer(x, cos, sin, cu, max_len, ln1, wq, wk, wv, bq, bk, bv, qn, kn, wo, ln2, wg, wu, wd,
              *ad):  # fmt: skip
        ad = ad or (None,) * 14
        t = x.shape[0]
        h = _rms(x, ln1, eps)
        bias = torch.cat((bq, bk, bv)) if has_bias else None
        qkv = F.linear(h, torch.cat((wq, wk, wv)), bias)
        q, k, v = qkv.split((heads * hd, kv * hd, kv * hd), dim=-1)
        q, k, v = plus(q, h, *ad[0:2]), plus(k, h, *ad[2:4]), plus(v, h, *ad[4:6])
        q, k, v = q.reshape(t, heads, hd), k.reshape(t, kv, hd), v.reshape(t, kv, hd)
        if qk_norm:
            q, k = _rms(q, qn, eps), _rms(k, kn, eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if attn_options is None:
            o = _padded_attention(q, k, v, cu, max_len)
        else:
            o = _varlen_call(q, k, v, cu, max_len, attn_options).reshape(t, -1)
        x = x + plus(F.linear(o, wo), o, *ad[6:8])
        h = _rms(x, ln2, eps)
        gate, up = F.linear(h, torch.cat((wg, wu))).chunk(2, dim=-1)
        gate, up = plus(gate, h, *ad[8:10]), plus(up, h, *ad[10:12])
        act = F.silu(gate) * up
        return x + plus(F.linear(act, wd), act, *ad[12:14])

    return layer


def _layer_weights(layer) -> tuple:
    a, m = layer.self_attn, layer.mlp
    qn = a.q_norm.weight if a.q_norm is not None else None
    kn = a.k_norm.weight if a.k_norm is not None else None
    return (
        layer.input_layernorm.weight,
        a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
        a.q_proj.bias, a.k_proj.bias, a.v_proj.bias,
        qn, kn, a.o_proj.weight,
        layer.post_attention_layernorm.weight,
        m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
    )  # fmt: skip


def _projections(layer) -> tuple:
    a, m = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)


def _layer_adapters(layer) -> tuple:
    """(A, B) of each projection (q, k, v, o, gate, up, down), None for one without an active
    LoRA adapter: the 14 trailing arguments of a LoRA layer function."""
    out: list = []
    for proj in _projections(layer):
        on = isinstance(proj, LoraLinear) and proj.active
        out += [proj.lora_A, proj.lora_B] if on else [None, None]
    return tuple(out)


def _lora_spec(model) -> tuple[float, float] | None:
    """(scale, dropout) of the model's active LoRA adapters, or None when it runs none.

    Dropout applies in training mode, as the modules' own; every adapter of a model
    shares its settings (`apply_lora` gives them one).
    """
    specs = {
        (m.scale, float(getattr(m.dropout, "p", 0.0)))
        for m in model.modules()
        if isinstance(m, LoraLinear) and m.active
    }
    if not specs:
        return None
    if len(specs) > 1:
        raise ValueError(f"packed forward: LoRA layers with different (scale, dropout): {specs}")
    scale, p = specs.pop()
    return scale, (p if model.training else 0.0)


_COMPILED: dict[tuple, object] = {}
# Inductor options tried in turn. Its memory-coalescing tiling analysis fails an assertion
# on this layer with dynamic shapes at the 1.5B width (torch 2.11: InductorError in
# tiling_utils.get_pw_red_splits), which left that shape on eager layers; without it the
# layer compiles at every width measured.
COMPILE_OPTIONS: tuple[dict, ...] = ({"triton.coalesce_tiling_analysis": False}, {})
CHECK_ERRORS: dict[tuple, dict] = {}  # the compile check's errors, per key (benchmarks read them)


def _layer_error(outs, truth) -> float:
    (y, g), (y_t, g_t) = outs, truth
    return max((y - y_t).norm() / y_t.norm(), (g - g_t).norm() / g_t.norm()).item()


def _compiled_layer_fn(
    model, attn_options: dict | None, sample_batch: PackedBatch, lora: tuple | None = None
):
    """The layer function through torch.compile, or None where compiling fails or disagrees.

    Fusing the elementwise work (norms, RoPE, SiLU, casts) cuts the kernel launches and
    autograd nodes of a layer several-fold, which is what bounds a training step's speed
    at this model size. Checked once, forward and backward: the compiled layer and the
    eager one (same dtype, same autocast) are both held to the layer in fp32, and the
    compiled one is kept when it is no further from it than rounding allows (a fixed
    bound between two bf16 layers would depend on the width: at the 1.5B shape a correct
    compiled layer can differ from the eager bf16 one by more than at 0.5B). With LoRA
    (`lora`, no dropout) the check's B matrices are random, so the update is exercised.
    """
    autocast_on = torch.is_autocast_enabled(model.device.type)
    key = (id(model.config), repr(attn_options), autocast_on, lora)
    if key in _COMPILED:
        return _COMPILED[key]
    _COMPILED[key] = None
    if lora is not None and lora[1]:
        report_decline("compiled decoder layer", "LoRA dropout in training mode; eager layers")
        return None
    eager = _make_layer_fn(model.config, attn_options, lora)
    try:
        layer = model.model.layers[0]
        n = min(48, sample_batch.num_tokens)
        cu = torch.tensor([0, n // 3, n], dtype=torch.int32, device=model.device)
        pos = torch.cat((torch.arange(n // 3), torch.arange(n - n // 3))).to(model.device)
        rope = pack_rope(model, pos)
        cos, sin = rope.cos, rope.sin
        gen = torch.Generator().manual_seed(0)
        x0 = torch.randn(n, model.config.hidden_size, generator=gen).to(model.device, model.dtype)
        weights = _gathered(layer, _layer_weights)
        if lora is not None:  # B starts at zero: random ones, so the update counts
            ab = _layer_adapters(layer)
            bs = [
                None if t is None else (0.02 * torch.randn(t.shape, generator=gen)).to(t)
                for t in ab[1::2]
            ]
            weights += tuple(t for pair in zip(ab[0::2], bs) for t in pair)

        def run(fn, x_in, ws, cast: bool = True):
            # the check differentiates, also when asked for from a no-grad pass (the reference)
            ctx = (
                contextlib.nullcontext()
                if cast
                else torch.autocast(x_in.device.type, enabled=False)
            )
            with torch.enable_grad(), ctx:
                x = x_in.clone().requires_grad_()
                y = fn(x, cos, sin, cu, n - n // 3, *ws)
                (gx,) = torch.autograd.grad(y.float().square().mean(), x)
            return y.detach().float(), gx.float()

        fp32 = tuple(w.float() if w is not None else None for w in weights)
        truth = run(_make_layer_fn(model.config, None, lora), x0.float(), fp32, cast=False)
        err_e = _layer_error(run(eager, x0, weights), truth)
        failures = []
        for options in COMPILE_OPTIONS:
            try:
                compiled = torch.compile(
                    _make_layer_fn(model.config, attn_options, lora),
                    dynamic=True,
                    options=options,
                )
                err_c = _layer_error(run(compiled, x0, weights), truth)
                break
            except Exception as exc:  # noqa: BLE001 - an Inductor failure: the next options
                failures.append(f"{options}: {type(exc).__name__}: {str(exc)[:120]}")
        else:
            raise RuntimeError("; ".join(failures))
        CHECK_ERRORS[key] = {"eager_vs_fp32": err_e, "compiled_vs_fp32": err_c}
        if err_c <= max(2e-2, 2 * err_e):
            _COMPILED[key] = compiled
        else:
            report_decline(
                "compiled decoder layer",
                f"further from fp32 than eager (relative error {err_c:.3g} against {err_e:.3g})",
            )
    except Exception as exc:  # noqa: BLE001 - no compiler, or it failed: the eager path serves
        report_decline("compiled decoder layer", f"torch.compile failed ({type(exc).__name__}: "
                  f"{str(exc)[:160]}); eager layers")  # fmt: skip
    return _COMPILED[key]


def checkpointed_layers(checkpoint: bool | int, layers: int) -> int:
    """How many decoder layers, from the first, a `checkpoint` setting recomputes: True =
    every layer, False = none, an int = that many (`activation_plan` picks one)."""
    if isinstance(checkpoint, bool):
        return layers if checkpoint else 0
    return max(0, min(int(checkpoint), layers))


def packed_hidden_states(
    model,
    batch: PackedBatch,
    attention: str = "auto",
    checkpoint: bool | int = False,
    compile: bool | None = None,
) -> torch.Tensor:
    """Final-norm hidden states (T, hidden) of a pack; attention stays inside each sequence.

    `compile=None` compiles the layer on CUDA (where the launch count bounds the speed
    of the policy, old-policy and reference passes alike) and runs eagerly elsewhere.
    `checkpoint`: which layers recompute their activations in the backward
    (`checkpointed_layers`); only when differentiating.
    """
    options = _attention_options(attention, model)
    grad = torch.is_grad_enabled()
    if compile is None:
        compile = model.device.type == "cuda"
        if not compile:
            report_decline(
                "compiled decoder layer", f"device is {model.device.type}", expected=True
            )
    lora = _lora_spec(model)
    layer_fn = _compiled_layer_fn(model, options, batch, lora) if compile else None
    layer_fn = layer_fn or _make_layer_fn(model.config, options, lora)
    rope = pack_rope(model, batch.position_ids)
    recomputed = checkpointed_layers(checkpoint, len(model.model.layers)) if grad else 0
    x = model.model.embed_tokens(batch.input_ids)
    for i, layer in enumerate(model.model.layers):
        x = layer.run_with_weights(
            _run_layer, x, rope, batch, layer_fn, lora is not None, i < recomputed
        )
    return model.model.norm(x)


class _Rope:
    """The pack's fp32 cos/sin tables, in a plain object: FSDP2 casts a forward's floating
    tensor arguments to the compute dtype, and RoPE is computed in fp32 (as one process does)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin


def pack_rope(model, positions: torch.Tensor) -> _Rope:
    """The RoPE tables of a pack's positions (T,), shaped (T, 1, D/2) for every head."""
    cos, sin = rope_tables(positions, model.inv_freq)
    return _Rope(cos[:, None, :], sin[:, None, :])


def _run_layer(layer, x, rope: _Rope, batch: PackedBatch, layer_fn, lora: bool, checkpoint: bool):
    """`layer_fn` over `layer`'s weights (gathered by FSDP2 when sharded: this runs as the
    layer's forward), recomputed in the backward when `checkpoint`."""
    args = (x, rope.cos, rope.sin, batch.cu_seqlens, batch.max_seqlen, *_layer_weights(layer))
    args += _layer_adapters(layer) if lora else ()
    if checkpoint:
        return _checkpoint(layer_fn, *args, use_reentrant=False)
    return layer_fn(*args)


def _gathered(module, read):
    """`read(module)` with the module's whole weights: an FSDP2 unit is gathered for the
    call (outside its forward) and sharded again after; anything else is read as it is."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return read(module)
    module.unshard()
    try:  # clones that need gradients as the weights do: autograd saves what training saves
        return tuple(
            t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
            for t in read(module)
        )
    finally:
        module.reshard()


def autocast(model, amp: bool | torch.dtype | None):
    """Autocast for the forward: `None` = bf16 when the weights are fp32 on CUDA (fp32 master
    weights); True = bf16; a dtype = that dtype (fp32 = none); False = none."""
    if amp is None:
        amp = model.device.type == "cuda" and model.dtype == torch.float32
    if isinstance(amp, torch.dtype):
        if amp == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(model.device.type, dtype=amp)
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


def packed_logprobs(
    model,
    batch: PackedBatch,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    attention: str = "auto",
    checkpoint: bool | int = False,
    amp: bool | torch.dtype | None = None,
    compile: bool | None = None,
    with_entropy: bool = False,
):
    """Log-prob (M,) of each completion token of a pack under `model` (differentiable);
    with `with_entropy`, (log-probs, entropies) of those positions."""
    with autocast(model, amp):
        return model.run_with_weights(
            _pack_logprobs, batch, temperature, chunk_size, attention, checkpoint, compile,
            with_entropy,
        )  # fmt: skip


def _pack_logprobs(
    model, batch, temperature, chunk_size, attention, checkpoint, compile, with_entropy
):
    """`packed_logprobs` inside the model's forward (under FSDP2: its root weights gathered)."""
    hidden = packed_hidden_states(model, batch, attention, checkpoint, compile)
    picked = hidden.index_select(0, batch.pred_index)
    return chunked_logprobs(
        picked, model.lm_head.weight, batch.targets, temperature, chunk_size, with_entropy
    )


def to_rows(values: torch.Tensor, batch: PackedBatch, fill: float = 0.0) -> torch.Tensor:
    """(M,) per-token values of a pack -> (n, width), one row per packed sequence."""
    out = values.new_full((batch.num_sequences, batch.width), fill)
    return out.index_put((batch.local_row, batch.col), values)
