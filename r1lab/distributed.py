"""Many processes on PyTorch's own engine: `torchrun`, `torch.distributed` and FSDP2.

Nothing here communicates by itself: every exchange is a `torch.distributed` collective
(NCCL on GPUs, gloo on CPU) and sharding is `torch.distributed.fsdp.fully_shard`.

- `init(device)`: joins the process group torchrun describes in the environment (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; NCCL for CUDA tensors and gloo for
  CPU ones on a GPU machine, gloo alone otherwise), with a timeout
  (`R1LAB_DIST_TIMEOUT_S`, default 600 s) so a dead peer ends in an error, not a hang.
  Without torchrun (no WORLD_SIZE, or 1) it does nothing and every helper below is the
  one-process identity.
- `check_agreement(fingerprint)`: every rank must run the same config on the same world
  size; the first rank that differs from rank 0 is named in the error.
- `shard_model(model, dtype)`: FSDP2 over each decoder layer, then the root, with a
  mixed-precision policy (parameters cast to the compute dtype for forwards, gradients
  reduced in fp32). The model's `hidden_states` method is registered as a forward, so
  the log-prob helpers that call it gather the root's parameters.
- `full_state_dict(model)` / `plain_model(...)` / `refresh_plain(...)`: the whole weights
  on every rank (the sampler's copy, refreshed one FSDP unit at a time; the HF export); `grad_scale()`: FSDP averages gradients over ranks, and
  a loss already divided by a global normaliser must be multiplied by the world size so
  the summed gradient is the one-process gradient.
"""

from __future__ import annotations

import gc
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "R1LAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
_BACKEND = ""  # what init() joined with


class DistributedError(RuntimeError):
    """Ranks disagree, or one of them failed or did not answer in time."""


# ---- who am I --------------------------------------------------------------------------------
def launched() -> bool:
    """True when started by torchrun (or alike) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def local_device(device: str) -> str:
    """On CUDA, this process's GPU (LOCAL_RANK); otherwise `device` unchanged."""
    if launched() and str(device).startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def init(device: str = "cpu") -> bool:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); False when not launched."""
    if not launched():
        return False
    if dist.is_initialized():
        return True
    global _BACKEND
    backend = "gloo"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        # NCCL for CUDA tensors, gloo for CPU ones: a model the config keeps on the CPU
        # (and the object collectives) still works on a GPU machine.
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    who = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE')}"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except Exception as err:  # noqa: BLE001 - re-raised with the rank and the address
        raise DistributedError(
            f"{who}: could not join the {backend} process group at {where} within "
            f"{timeout_s():g}s ({TIMEOUT_ENV}): {err}"
        ) from err
    _BACKEND = backend
    return True


def close(wait: bool = False) -> None:
    """End the process group. `wait`: meet every rank at a barrier first, so no rank tears
    its connections down while a peer still uses them (gloo then aborts the peer: "terminate
    called without an active exception"). Only after success: a failed peer never arrives."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        _drain_collective_threads()


def _drain_collective_threads(pause_s: float = 0.2) -> None:
    """Let gloo's worker threads drop the collectives they finished before Python shuts down.

    A worker releases a finished collective (an FSDP all-gather, say) after the caller has
    already gone on; releasing its tensors takes the GIL. If the interpreter is finalizing by
    then, the thread is cancelled inside C++ and the process aborts with "terminate called
    without an active exception" after a run that succeeded (3 times in about 35 two-rank
    runs on a loaded 2-core machine). Collecting garbage frees what cycles still hold
    (FSDP's module state), and the pause hands the GIL to any worker still waiting for it."""
    gc.collect()
    time.sleep(pause_s)


# ---- agreement and failures ------------------------------------------------------------------
def check_agreement(fingerprint: str, what: str = "config") -> None:
    """Every rank must see the same world size and `fingerprint`; the error names the rank."""
    if not active():
        return
    mine = {
        "rank": rank(),
        "world": world_size(),
        "env_world": int(os.environ.get("WORLD_SIZE", world_size())),
        "fingerprint": fingerprint,
    }
    everyone: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(everyone, mine)
    except Exception as err:  # noqa: BLE001
        raise DistributedError(
            f"rank {rank()}: a peer did not answer the {what} check within {timeout_s():g}s: {err}"
        ) from err
    first = everyone[0]
    for other in everyone[1:]:
        if other["env_world"] != first["env_world"] or other["world"] != first["world"]:
            raise DistributedError(
                f"rank {other['rank']} runs with world size {other['env_world']}, rank 0 with "
                f"{first['env_world']}: every rank must be launched with the same --nproc/--nnodes"
            )
        if other["fingerprint"] != first["fingerprint"]:
            raise DistributedError(
                f"rank {other['rank']} has {what} fingerprint {other['fingerprint']}, rank 0 has "
                f"{first['fingerprint']}: every rank must run the same {what} (same preset, "
                "overrides and data)"
            )


def fail_message(err: BaseException) -> str:
    """An exception as one line that names this rank (used by the CLI under torchrun)."""
    return f"rank {rank()} of {world_size()}: {type(err).__name__}: {err}"


class NullLog:
    """The metrics and sample logs of ranks other than 0 (rank 0 writes the run dir)."""

    def write(self, record: dict) -> None:
        pass


# ---- collectives -----------------------------------------------------------------------------
def all_reduce_sum(value: float) -> float:
    """The sum over ranks of a number (the number itself on one process)."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_sums(values: list[float]) -> list[float]:
    """Each number summed over ranks, in one collective (the numbers themselves on one
    process)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float) -> float:
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] on one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum the gradients of `model`'s trainable parameters over ranks, in place, in one
    collective: data parallelism for a model every rank holds whole (a LoRA run: a frozen
    base and small adapters, where sharding would save little). Summed, not averaged: each
    rank's loss already carries the global normaliser."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).to(p.dtype)


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where the numbers the helpers above reduce live: the CPU wherever gloo is joined."""
    if "gloo" in _BACKEND or dist.get_backend() == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def shard_of(n: int, r: int | None = None, world: int | None = None) -> range:
    """Rank `r`'s contiguous share of `n` items (the first `n % world` ranks get one more)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


# ---- FSDP2 -----------------------------------------------------------------------------------
def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(
    model: torch.nn.Module,
    compute_dtype: torch.dtype = torch.float32,
    layers=None,
    reshard_root: bool = False,
) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) of each decoder layer and of the root, in place; returns it.

    Parameters stay fp32 (master weights, sharded with their gradients and the optimizer
    state built after this call); forwards run in `compute_dtype`, gradients are reduced in
    fp32. The optimizer must be created after sharding. `layers`: the decoder layers, each
    its own FSDP unit (default `model.model.layers`; a module that wraps a decoder, such as
    the reward model, passes its decoder's), the rest of `model` is the root's unit. The
    root keeps its weights gathered from its forward to its backward; `reshard_root` shards
    them again after each forward instead (a model that never runs a backward: GRPO's
    reference).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if not active():
        return model
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers if layers is None else layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        if hasattr(layer, "run_with_weights"):  # the packed training path calls layers so
            register_fsdp_forward_method(layer, "run_with_weights")
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_root)
    for method in ("hidden_states", "run_with_weights"):  # a decoder's other forwards
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """`src`'s current weights into `dst` (the GRPO reference refresh), cast to `dst`'s
    dtype. Two models sharded alike (same architecture, same mesh) copy shard to shard,
    with no gather; otherwise `dst` loads `src`'s whole state dict."""
    if is_sharded(dst) and is_sharded(src):
        from torch.distributed.fsdp import FSDPModule

        # a root unit keeps its weights gathered after a forward without a backward (the
        # reference's): shards again first, so every parameter is its DTensor
        for unit in [*dst.modules(), *src.modules()]:
            if isinstance(unit, FSDPModule):
                unit.reshard()
        with torch.no_grad():
            for d, s in zip(dst.parameters(), src.parameters(), strict=True):
                d.to_local().copy_(s.to_local())
        return
    dst.load_state_dict(full_state_dict(src))


def grad_scale() -> float:
    """Multiply a globally normalised loss by this: FSDP divides the summed gradient by it."""
    return float(world_size())


def full_state_dict(model: torch.nn.Module, cpu: bool = False) -> dict[str, torch.Tensor]:
    """The whole weights by name, on every rank (`cpu`: offloaded, on rank 0 only)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=cpu)
    return get_model_state_dict(model, options=opts)


def plain_model(config, state: dict[str, torch.Tensor], device, dtype=None):
    """An ordinary (unsharded) Transformer holding `state`: the sampler's or the exporter's."""
    from r1lab.model.transformer import Transformer, rope_inv_freq

    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.requires_grad_(False)
    return model.eval()


def refresh_plain(plain: torch.nn.Module | None, sharded: torch.nn.Module) -> None:
    """Copy the sharded model's current weights into its plain copy (every rank; None: no
    copy, nothing to do)."""
    if plain is None:
        return
    targets = plain.state_dict()
    if not is_sharded(sharded):
        with torch.no_grad():
            for name, p in sharded.state_dict().items():
                if name in targets:
                    targets[name].copy_(p)
        return
    # One FSDP unit at a time (each decoder layer, then the root): the gathered weights of
    # one layer in the compute dtype, never the whole fp32 state (30 GB at 7B) at once.
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for unit in [m for m in sharded.modules() if isinstance(m, FSDPModule)]:
            unit.unshard()
            for name, p in sharded.named_parameters():
                if not isinstance(p, DTensor) and name in targets:
                    targets[name].copy_(p)
            unit.reshard()


# ---- the launcher ----------------------------------------------------------------------------
def torchrun_command(argv: list[str]) -> list[str] | None:
    """`r1lab STAGE --nproc N ...` -> `torchrun --nproc-per-node N --no-python r1lab STAGE ...`.

    None when `argv` has no `--nproc` (or it is 1, or this process is already one of
    torchrun's). One node (`--standalone`); for several, call torchrun yourself
    (docs/distributed.md).
    """
    import shutil
    import sys

    rest, nproc, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc" and i + 1 < len(argv):
            nproc, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--nproc="):
            nproc = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if nproc is None or launched():
        return None
    if not nproc.isdigit() or int(nproc) < 1:
        raise ValueError(f"--nproc must be a positive number of processes, got {nproc!r}")
    if int(nproc) == 1:
        return None
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    # this interpreter, not whatever `r1lab` is on PATH (there may be none: a checkout on
    # PYTHONPATH, as on the GPU machine)
    r1lab = [sys.executable, "-m", "r1lab.cli"]
    return [*launcher, "--standalone", "--nproc-per-node", nproc, "--no-python", *r1lab, *rest]
