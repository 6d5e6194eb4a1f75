"""The one decoder: Llama 2/3, Qwen2/2.5 and Qwen3 dense checkpoints in a single file.

Parameter names are exactly Hugging Face's, so a checkpoint maps key for key. Three
forwards share one code path:
- padded batches (`attention_mask`, left or right padding),
- packed sequences (`position_ids` restarting at 0 for every document; attention never
  crosses a document boundary),
- decoding with a KV cache (`cache=model.new_cache(...)`), one or more tokens per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from r1lab.model.config import ModelConfig


# ---- the decoder's math as plain functions ---------------------------------------------------
# The modules below call these, and so do the fast paths (engine/fast_generate's prefill and
# torch ops, engine/fast_train's packed layer), so the math is written once.
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim; statistics in fp32 (as the reference
    implementations do, for bf16 stability), the normalised x rounded to x's dtype before
    the weight multiplies it."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: positions (...,) -> two (..., head_dim / 2)."""
    freqs = positions[..., None].float() * inv_freq
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., D), Hugging Face's half-split layout, in fp32.

    cos/sin hold the D/2 distinct frequencies (`rope_tables`) and broadcast against x's
    leading dims; the halves (x1, x2) become (x1 cos - x2 sin, x2 cos + x1 sin), which is
    `x * cos + rotate_half(x) * sin` with the tables doubled, to the bit.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's activation: silu(gate) * up."""
    return F.silu(gate) * up


def padded_causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) attention mask of a padded batch: causal, real keys only.

    valid (B, T) is True at real tokens. A padding query with no visible key would give NaN,
    so every query also sees itself.
    """
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


def padded_positions(valid: torch.Tensor) -> torch.Tensor:
    """Rotary positions of a padded batch: each row counts its real tokens from 0."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary frequencies, with linear or llama3 scaling applied when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif config.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
        # in between interpolated smoothly.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


class KVCache:
    """Preallocated keys and values for every layer, plus which slots hold real tokens.

    `length` slots are filled (the same for every row; padding slots are marked invalid),
    `next_pos` is each row's next rotary position.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def repeat_interleave(self, n: int) -> KVCache:
        """Each row repeated n times in place (prefill a prompt once, sample it n times)."""
        if n == 1:
            return self
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        self.valid = self.valid.repeat_interleave(n, dim=0)
        self.next_pos = self.next_pos.repeat_interleave(n, dim=0)
        return self

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep only `rows` (drop finished sequences from the batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.valid = self.valid[rows]
        self.next_pos = self.next_pos[rows]
        return self


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, is_causal: bool, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[self.layer_idx][:, :, start : start + t] = k
            cache.v[self.layer_idx][:, :, start : start + t] = v
            k = cache.k[self.layer_idx][:, :, : start + t]
            v = cache.v[self.layer_idx][:, :, : start + t]
        # Grouped-query attention inside the kernel: no copy of the shared key/value heads.
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            enable_gqa=self.n_kv != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class RunsWithWeights:
    """`run_with_weights(fn, *args)`: `fn(self, *args)` as a forward of this module.

    The packed training path (r1lab.engine.fast_train) reads a module's weights itself
    instead of calling `forward`. Under FSDP2, `r1lab.distributed.shard_model` registers
    this method as a forward, so the weights are gathered around the call and their
    gradients reduced after it, as for `forward`; on one process it is a plain call."""

    def run_with_weights(self, fn, *args):
        return fn(self, *args)


class DecoderLayer(RunsWithWeights, nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Holds the `model.*` parameters (named as in Hugging Face checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(RunsWithWeights, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    # ---- construction ---------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """Small normal init; residual output projections scaled down by depth (GPT-2)."""
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.dtype)

    # ---- forward -------------------------------------------------------------------------
    def _positions_and_mask(self, input_ids, attention_mask, position_ids, cache):
        """Rotary positions (B, T) and the attention mask (None = plain causal)."""
        b, t = input_ids.shape
        device = input_ids.device
        if cache is not None:
            new_valid = (
                torch.ones(b, t, dtype=torch.bool, device=device)
                if attention_mask is None
                else attention_mask.bool()
            )
            if position_ids is None:
                position_ids = cache.next_pos[:, None] + new_valid.long().cumsum(1) - 1
                position_ids = position_ids.clamp(min=0)
            start = cache.length
            if start + t > cache.max_len:
                raise ValueError(f"KV cache overflow: {start + t} tokens > max_len {cache.max_len}")
            cache.valid[:, start : start + t] = new_valid
            cache.next_pos += new_valid.long().sum(1)
            keys = cache.valid[:, : start + t]
            causal = torch.ones(t, start + t, dtype=torch.bool, device=device).tril(start)
            mask = causal[None] & keys[:, None, :]
            # A padding query with no visible key would give NaN; let it see itself.
            mask[:, torch.arange(t, device=device), start + torch.arange(t, device=device)] = True
            return position_ids, mask[:, None]
        if attention_mask is not None:
            valid = attention_mask.bool()
            if position_ids is None:
                position_ids = padded_positions(valid)
            if bool(valid.all()):
                return position_ids, None
            return position_ids, padded_causal_mask(valid)
        if position_ids is not None:
            # Packed documents: a new document starts wherever the position resets to 0.
            doc = (position_ids == 0).long().cumsum(1)
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            mask = causal[None] & (doc[:, :, None] == doc[:, None, :])
            return position_ids, mask[:, None]
        position_ids = torch.arange(t, device=device)[None].expand(b, t)
        return position_ids, None

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden); the LM head is applied by the caller."""
        positions, mask = self._positions_and_mask(input_ids, attention_mask, position_ids, cache)
        cos, sin = rope_tables(positions, self.inv_freq)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): broadcast over the heads
        x = self.model.embed_tokens(input_ids)
        is_causal = cache is None
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, is_causal, cache, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.model.norm(x)

    def forward(self, *inputs, **named_inputs) -> torch.Tensor:
        """Logits (batch, seq, vocab): the LM head on `hidden_states`, whose arguments these
        are (input_ids, attention_mask, position_ids, cache), so the two cannot drift."""
        return self.lm_head(self.hidden_states(*inputs, **named_inputs))
