"""The GPU decode engine: weights, a static KV cache and one decode step replayed as a graph.

At GRPO's shape (hundreds of rows, one new token each) a decode step must read about a
gigabyte of weights and KV cache, well under a millisecond on an H200, but the eager
sampler spends far longer launching hundreds of small kernels, expanding the shared KV
heads, sampling through several passes over the vocabulary and syncing with the host for
every token. Here:

- the weights are copied into the engine's own buffers at the start of each call (bf16 by
  default, whatever the policy's master dtype), with q/k/v and gate/up each fused into one
  matrix so a layer is four matmuls;
- the KV cache is preallocated for (rows, prompt width + max_new_tokens), and everything a
  step reads or writes (token, position, cache slot, step count, finished flags, outputs)
  lives in device buffers, so one captured CUDA graph serves every step and the host only
  replays it;
- the fused operations of a step (`decode_ops`: Triton kernels, or the same in torch)
  replace what would be many launches;
- each prompt is prefilled once (the model's math, eager) and its cache copied to its `n`
  rows (the GRPO group);
- the host looks at the finished flags every `CHECK_EVERY` steps only, and stops as soon
  as every row has stopped.

`fast_generate` keeps one engine per model and turns its output into `Completion`s.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1lab.engine.decode_ops import (
    HAS_TRITON,
    MAX_STOP_IDS,
    TorchOps,
    TritonOps,
    attention_partials,
)
from r1lab.engine.fallbacks import declined
from r1lab.engine.sampling import SamplingParams, filter_logits
from r1lab.model.transformer import (
    apply_rope,
    padded_causal_mask,
    padded_positions,
    rms_norm,
    rope_tables,
    swiglu,
)

CHECK_EVERY = 16  # decode steps between two looks at the finished flags (one host sync)


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
        self.ops = TritonOps() if use_triton else TorchOps()
        self.use_graphs = (dev.type == "cuda" and use_triton) if use_graphs is None else use_graphs
        if dev.type == "cuda" and not use_triton:
            why = "Triton is not installed" if not HAS_TRITON else "use_triton=False was passed"
            declined("decode kernels", f"{why}; the decode step runs as eager torch ops")
        elif dev.type == "cuda" and not self.use_graphs:
            declined("decode CUDA graph", "use_graphs=False was passed; every step is launched")
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
        cos, sin = rope_tables(torch.arange(max_len, device=dev), model.inv_freq)
        self.cos, self.sin = cos.contiguous(), sin.contiguous()
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
        self.row_keys = torch.zeros(rows, device=dev, dtype=torch.long)  # sampling.row_keys
        self.temperature = torch.ones(1, device=dev, dtype=torch.float32)
        self.finished = torch.zeros(rows, device=dev, dtype=torch.bool)
        self.lengths = torch.zeros(rows, device=dev, dtype=torch.long)
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, device=dev, dtype=torch.long)
        self.sampled = torch.zeros(rows, device=dev, dtype=torch.long)
        self.sampled_lp = torch.zeros(rows, device=dev, dtype=torch.float32)
        self.out_tokens = torch.zeros(rows, max_len, device=dev, dtype=torch.long)
        self.out_logprobs = torch.zeros(rows, max_len, device=dev, dtype=torch.float32)
        # activations of one step
        self.x = empty(rows, self.hidden)
        self.h = empty(rows, self.hidden)
        self.sample_stats = self.sample_index = None  # the sampler's per-slice results
        self.attn = empty(rows, self.n_heads * self.head_dim)
        self.attn_partials = (  # the split-K attention's per-split results, for every layer
            attention_partials(rows, self.n_heads, self.n_kv, self.head_dim, max_len, dev)
            if use_triton
            else None
        )
        self.act = empty(rows, self.ffn)
        self.graphs: dict[_Mode, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.last_stats: dict = {}  # timings of the latest `generate`

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
        positions = padded_positions(valid)
        cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]
        attn_mask = padded_causal_mask(valid)
        h_dim, kd = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        rep = self.n_heads // self.n_kv
        x = F.embedding(ids, self.embed)
        for i in range(self.n_layers):
            h = rms_norm(x, self.ln1[i], self.eps)
            qkv = F.linear(h, self.w_qkv[i], self.b_qkv[i])
            q = qkv[..., :h_dim].view(p, w, self.n_heads, self.head_dim)
            k = qkv[..., h_dim : h_dim + kd].view(p, w, self.n_kv, self.head_dim)
            v = qkv[..., h_dim + kd :].view(p, w, self.n_kv, self.head_dim)
            if self.qk_norm:
                q, k = rms_norm(q, self.q_norm[i], self.eps), rms_norm(k, self.k_norm[i], self.eps)
            q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
            v = v.transpose(1, 2)
            self.k_cache[i][:rows, :, :w] = k.repeat_interleave(n, dim=0)
            self.v_cache[i][:rows, :, :w] = v.repeat_interleave(n, dim=0)
            out = F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=attn_mask
            )
            x = x + F.linear(out.transpose(1, 2).reshape(p, w, -1), self.w_o[i])
            h = rms_norm(x, self.ln2[i], self.eps)
            gu = F.linear(h, self.w_gu[i])
            x = x + F.linear(swiglu(gu[..., : self.ffn], gu[..., self.ffn :]), self.w_down[i])
        last = rms_norm(x[:, -1], self.final_norm, self.eps)
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
            # The nucleus is that of the tempered distribution (as the reference sampler's);
            # the kernels divide the filtered scores by the temperature themselves, hence
            # the multiplication back.
            scaled = logits.float() / self.temperature
            filtered = filter_logits(scaled, mode.top_k, mode.top_p) * self.temperature
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
        q.copy_(rms_norm(q, self.q_norm[i], self.eps))
        k.copy_(rms_norm(k, self.k_norm[i], self.eps))

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
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        params: SamplingParams,
        stop_ids: set[int],
        keys: list[int],
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Token ids and log-probs of every row (n per prompt, grouped), stop token included.
        `keys`: each row's sampling key (`sampling.row_keys`)."""
        max_new = params.max_new_tokens
        greedy = params.temperature == 0
        mode = _Mode(greedy, 0 if greedy else params.top_k, 1.0 if greedy else params.top_p)
        self.stop_ids.fill_(-1)
        if stop_ids:
            self.stop_ids[: len(stop_ids)] = torch.tensor(sorted(stop_ids), device=self.device)
        self.temperature.fill_(1.0 if greedy else params.temperature)
        self.row_keys.zero_()
        self.row_keys[: len(keys)] = torch.tensor(keys, dtype=torch.long, device=self.device)
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
        self.last_stats = dict(
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
