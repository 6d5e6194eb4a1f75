"""How much memory a decoder layer's activations take, and how many layers to recompute.

The packed training pass (`r1lab.engine.fast_train`) can recompute any number of its
layers in the backward (`checkpointed_layers`). Recomputing costs a second forward of the
layer; keeping costs memory that grows with the micro-batch's tokens. Here:

- `activation_bytes_per_token`: what one layer keeps per token, measured on the model
  itself on CUDA (layer 0 run over two pack sizes, the slope of the memory still held);
- `activation_plan`: the fewest layers to recompute within a memory budget.

`r1lab.engine.grpo_update.plan_activations` turns `checkpoint_layers: auto` into a count
with these, from the GPU's free memory.
"""

from __future__ import annotations

import torch

from r1lab.engine.fast_train import (
    _compiled_layer_fn,
    _lora_spec,
    _make_layer_fn,
    _run_layer,
    pack_rollouts,
    pack_rope,
)
from r1lab.engine.pack_attention import _attention_options

_ACTIVATION_BYTES: dict[tuple, tuple[float, float]] = {}


def activation_bytes_per_token(
    model, attention: str = "auto", compile: bool | None = None, sizes=(1024, 3072)
) -> tuple[float, float]:
    """(bytes a token, bytes a call) one decoder layer keeps for its backward, its output
    included, as this model's packed layer function runs here (compiled or not, varlen or
    padded attention, the current autocast). Measured on CUDA, once per model and setting:
    layer 0 runs once to warm up (autocast's cached weight casts, compilation), then over
    two pack sizes; the slope of the memory still held while the output is alive is the
    per-token part, the intercept what a kept layer holds whatever its tokens (the
    concatenated q/k/v and gate/up weights it saves).
    """
    key = (id(model.config), attention, compile, torch.is_autocast_enabled("cuda"))
    if key in _ACTIVATION_BYTES:
        return _ACTIVATION_BYTES[key]
    held = []
    for t in (sizes[0], *sizes):  # the first run warms up and is not counted
        probe = LayerProbe(model, t, attention, compile)
        torch.cuda.synchronize(model.device)
        before = torch.cuda.memory_allocated(model.device)
        y = probe.forward()
        held.append(torch.cuda.memory_allocated(model.device) - before)
        del y
    slope = max((held[2] - held[1]) / (sizes[1] - sizes[0]), 1.0)
    _ACTIVATION_BYTES[key] = (slope, max(held[1] - slope * sizes[0], 0.0))
    return _ACTIVATION_BYTES[key]


class LayerProbe:
    """Layer 0 as the packed pass runs it (`fast_train._run_layer`: its function, compiled
    or not, over the layer's own weights) on `tokens` random hidden states in two
    sequences, ready to run with gradients: what `activation_bytes_per_token` measures. The
    inputs are made here, so that `forward` allocates only what the layer keeps."""

    def __init__(self, model, tokens: int, attention: str, compile: bool | None):
        options, lora = _attention_options(attention, model), _lora_spec(model)
        halves = [[0] * (tokens // 2), [0] * (tokens - tokens // 2)]
        self.pack = pack_rollouts(halves, [[], []], max_tokens=tokens, device=model.device)[0]
        fn = _compiled_layer_fn(model, options, self.pack, lora) if compile is not False else None
        self.fn = fn or _make_layer_fn(model.config, options, lora)
        self.rope, self.lora = pack_rope(model, self.pack.position_ids), lora is not None
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, model.config.hidden_size, generator=gen)
        self.x = x.to(model.device, model.dtype).requires_grad_()
        self.layer = model.model.layers[0]

    def forward(self) -> torch.Tensor:
        with torch.enable_grad():
            return _run_layer(self.layer, self.x, self.rope, self.pack, self.fn, self.lora, False)


def activation_plan(
    model,
    tokens: int,
    budget_bytes: float,
    per_token: float,
    input_per_token: float,
    per_layer: float = 0.0,
) -> int:
    """How many layers (from the first) to recompute so that a micro-batch of `tokens`
    keeps its activations within `budget_bytes`.

    A layer run without recomputation keeps `per_token` bytes a token plus `per_layer`
    whatever its tokens; a recomputed one keeps only its input (`input_per_token`).
    Every layer is kept when they all fit, every layer recomputed when not even that fits
    (the budget is then a wish).
    """
    layers = len(model.model.layers)
    floor = layers * input_per_token * tokens
    extra = max(per_token - input_per_token, 1.0) * tokens + per_layer
    kept = int(max(budget_bytes - floor, 0.0) // extra)
    return layers - min(kept, layers)
