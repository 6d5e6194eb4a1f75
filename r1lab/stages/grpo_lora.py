"""GRPO with LoRA adapters (`r1lab grpo ... lora={r: 16, alpha: 32}`): the models and checkpoints.

`r1lab.stages.grpo` calls in here where a LoRA run differs from full fine-tuning:

- `load_models`: the base is loaded once, in the compute dtype (it never changes, so it
  needs no fp32 master copy), and `r1lab.model.lora.apply_lora` adds the adapters (fp32),
  the only trainable parameters, so the optimizer holds their state alone. The KL
  reference is `reference_view`: the same base tensors with the adapters off, not a
  second copy (a reference refresh snapshots the adapters into it: still no copy of the
  base). The samplers read weights directly, so they get `merged_view`: the adapted
  layers as plain layers holding W + (alpha / r) B A, every other tensor shared;
- `refresh_sampler`: recompute those merged weights from the current adapters before
  every rollout and evaluation (the first sampling after the last optimizer step);
- `trained_part`: what `state/` holds for the policy: the adapters (the base is the model
  folder's; a resume reloads it from `model` and restores adapters and optimizer exactly);
- `save_adapter`: `adapter/` in PEFT's layout beside the merged `model/`, as SFT saves.

Under torchrun a LoRA run is data-parallel without FSDP: every rank holds the frozen base
and the adapters whole (the base is not trained, so sharding it would save only its one
bf16 copy), trains on its share of each mini-batch, and the adapters' gradients are summed
over ranks in one collective (`r1lab.distributed.all_reduce_grads`) before clipping, so
every rank takes the one-process optimizer step and the replicas stay equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from r1lab import distributed
from r1lab.config import resolve_dtype
from r1lab.model.checkpoint import atomic_dir, load_model, resolve_model_dir
from r1lab.model.lora import (
    AdapterState,
    LoraSettings,
    apply_lora,
    lora_modules,
    merged_view,
    reference_view,
    refresh_merged,
    write_adapter,
)
from r1lab.model.tokenizer import load_tokenizer
from r1lab.training import console, make_optimizer

if TYPE_CHECKING:
    from r1lab.stages.grpo_config import Config

__all__ = [
    "LoraSettings",
    "load_models",
    "refresh_sampler",
    "save_adapter",
    "trained_part",
]

ADAPTER_DIR = "adapter"


def load_models(cfg: Config, device: str):
    """(policy, tokenizer, reference or None, optimizer, sampler) of a LoRA run.

    The policy is the base in the compute dtype with fp32 adapters; the reference (when
    beta > 0) and the sampler are views sharing its tensors (see the module docstring).
    """
    folder = resolve_model_dir(cfg.model)
    dtype = resolve_dtype(cfg.dtype, str(device))
    policy = load_model(folder, dtype=dtype, device=device)  # frozen: no fp32 master copy
    tokenizer = load_tokenizer(folder)
    adapted = apply_lora(policy, cfg.lora)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    console.print(
        f"grpo: LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {len(adapted)} layers: "
        f"{trainable:,} trainable of {policy.num_parameters():,} parameters"
    )
    ref_model = reference_view(policy) if cfg.beta > 0 else None
    optimizer = make_optimizer(policy, cfg.lr, weight_decay=cfg.weight_decay)
    return policy, tokenizer, ref_model, optimizer, merged_view(policy)


def refresh_sampler(sampler, policy) -> None:
    """Bring the sampling copy up to the policy's current weights (None: the policy samples):
    the merged weights of a LoRA run, or under torchrun the gathered full weights."""
    if sampler is not None and lora_modules(policy):
        refresh_merged(sampler, policy)
    else:
        distributed.refresh_plain(sampler, policy)


def trained_part(policy):
    """The policy's part of `state/`: its adapters under LoRA, else the whole model."""
    return AdapterState(policy) if lora_modules(policy) else policy


def save_adapter(policy, out: Path, base_model: str) -> None:
    """`out/adapter` (PEFT layout, written whole or not at all) when the policy has LoRA.

    Written before `model/` and `state/`, like `model/`: a kill leaves it at most one
    checkpoint ahead of `state/`, and the resume replays and rewrites it.
    """
    if not lora_modules(policy) or not distributed.is_main():
        return
    with atomic_dir(Path(out) / ADAPTER_DIR) as folder:
        write_adapter(policy, folder, base_model=base_model)
