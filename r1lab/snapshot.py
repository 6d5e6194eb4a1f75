"""The one writer and reader of a training stage's resumable checkpoint: `model/` + `state/`.

A checkpoint of a stage run dir is two folders, each written under a temporary name and
swapped into place (`r1lab.model.checkpoint.atomic_dir`: one atomic exchange of the names),
so a kill -9 never leaves half a folder, nor no folder, under either name (where the file
system cannot exchange names, a documented aside copy stands in, and loaders find it):

- `model/`: the Hugging Face folder users load (weights in the export dtype, tokenizer);
- `state/`: everything a resume needs, weights included (fp32), with the optimizer and RNG.

`model/` is written first, `state/` second. `state/` is the commit point: a resume reads
the weights from `state/` alone, never from `model/`, and `state/` appears only once the
`model/` of the same step is complete. So whenever `state/` exists, `model/` exists too and
holds the run's tokenizer (pretraining trains its own and reads it back on a resume). A kill
between the two writes leaves `model/` one checkpoint ahead of `state/`; the resume replays
those steps and overwrites it, and no DONE marker exists until the last write has finished.

Under torchrun (`r1lab.distributed`), `model/` is written once, by rank 0, from the full
weights gathered there, and `state/` holds `dcp/`: the parts' state dicts saved by every
rank through `torch.distributed.checkpoint`, which reshards on load. Such a `state/`
resumes on any number of ranks, one process included; a one-process `state/` resumes on
N ranks too (each rank reads the whole file and keeps its shards). Where no part is sharded
(a LoRA run under torchrun: every rank holds the same base and adapters), rank 0 writes the
one-process checkpoint and every rank reads it back whole.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from r1lab import distributed
from r1lab.model.checkpoint import (
    OPTIMIZER_NAME,
    RNG_NAME,
    TRAINER_STATE_NAME,
    _load_own,
    atomic_dir,
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_model,
    save_training_state,
)

DCP_DIR = "dcp"  # state/dcp: the torch.distributed.checkpoint of a run under torchrun
# writes a model/ folder from a model's whole weights by name (`save_checkpoint`'s export)
Export = Callable[[dict[str, torch.Tensor], Path], None]


class TrainingSnapshot:
    """Named parts (modules, optimizers) saved as one state dict in `state/`.

    Passed through the optimizer slot of `save_training_state`, so `state/` alone is a whole
    checkpoint: weights of one step are never paired with the optimizer of another. A part
    set to None is saved as None (e.g. a reference model not yet refreshed) and skipped on
    load; `parts` may be changed between saves.
    """

    def __init__(self, **parts: Any):
        self.parts = parts

    def state_dict(self) -> dict:
        return {
            name: part.state_dict() if part is not None else None
            for name, part in self.parts.items()
        }

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            if part is not None and state.get(name) is not None:
                part.load_state_dict(state[name])


def save_checkpoint(
    out: Path,
    snapshot: TrainingSnapshot,
    model,
    tokenizer,
    step: int,
    data_position: Any,
    extra: dict,
    export_dtype: str | torch.dtype | None = None,
    export: Export | None = None,
) -> None:
    """`out/model` (the loadable folder, `model` in `export_dtype`), then `out/state`.

    `export(weights, folder)` writes `model/` for a model that is not a plain decoder (the
    reward model: its decoder and its head), from its whole weights by name (gathered to
    rank 0 under torchrun), atomically as `save_model` does.
    """
    if distributed.active() and _sharded(snapshot):
        _save_distributed(
            out, snapshot, model, tokenizer, step, data_position, extra, export_dtype, export
        )
        return
    if not distributed.is_main():  # every rank holds the same whole parts (LoRA): rank 0's
        distributed.barrier()
        return
    if export is not None:
        export(model.state_dict(), Path(out) / "model")
    else:
        save_model(model, Path(out) / "model", tokenizer=tokenizer, dtype=export_dtype)
    save_training_state(
        Path(out) / "state",
        optimizer=snapshot,
        step=step,
        data_position=data_position,
        extra=extra,
    )
    distributed.barrier()  # the other ranks go on once it is written


def saved_state(out: Path) -> dict | None:
    """The trainer record of the resumable checkpoint in `out`, without loading tensors."""
    folder = latest_checkpoint(out)
    if folder is None:
        return None
    return json.loads((folder / TRAINER_STATE_NAME).read_text())


def restore_checkpoint(out: Path, snapshot: TrainingSnapshot) -> dict:
    """Load the snapshot's parts and the RNG from `out/state`; return step, data_position,
    extra."""
    folder = latest_checkpoint(out)
    if (folder / DCP_DIR).is_dir():
        _load_dcp(folder / DCP_DIR, snapshot)
        return load_training_state(folder)
    if distributed.active() and _sharded(snapshot):
        _load_full(folder / OPTIMIZER_NAME, snapshot)
        return load_training_state(folder)
    return load_training_state(folder, optimizer=snapshot)  # every rank reads it whole


def _sharded(snapshot: TrainingSnapshot) -> bool:
    """Whether a part is FSDP-sharded; if not, every rank holds the same whole parts (a
    LoRA run under torchrun) and rank 0 saves them as one process does."""
    return any(distributed.is_sharded(p) for p in snapshot.parts.values() if p is not None)


# ---- under torchrun ------------------------------------------------------------------------
def _owner(snapshot: TrainingSnapshot) -> torch.nn.Module:
    """The trained model: the first module part (the optimizers' parameters are its own)."""
    return next(p for p in snapshot.parts.values() if isinstance(p, torch.nn.Module))


def _dcp_state(snapshot: TrainingSnapshot) -> dict[str, Any]:
    """The parts' state dicts as torch.distributed.checkpoint saves them (by parameter name)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    owner, out = _owner(snapshot), {}
    for name, part in snapshot.parts.items():
        if isinstance(part, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(owner, part)
        elif isinstance(part, torch.nn.Module):
            out[name] = get_model_state_dict(part)
    return out


def _save_distributed(
    out, snapshot, model, tokenizer, step, data_position, extra, dtype, export
) -> None:
    import torch.distributed.checkpoint as dcp

    out = Path(out)
    full = distributed.full_state_dict(model, cpu=True)  # gathered to rank 0
    main = distributed.is_main()
    if main and export is not None:
        export(full, out / "model")
    elif main:
        plain = distributed.plain_model(model.config, full, "cpu")
        save_model(plain, out / "model", tokenizer=tokenizer, dtype=dtype)
    del full
    staging = out / ".state-dcp.tmp"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()
    dcp.save(_dcp_state(snapshot), checkpoint_id=str(staging))
    distributed.barrier()
    if main:
        meta = {"step": int(step), "data_position": data_position, "extra": extra or {}}
        text = json.dumps(meta, indent=2) + "\n"
        with atomic_dir(out / "state") as tmp:
            shutil.move(str(staging), str(tmp / DCP_DIR))
            torch.save(rng_state(), tmp / RNG_NAME)
            (tmp / TRAINER_STATE_NAME).write_text(text)  # last, as save_training_state
    distributed.barrier()


def _load_dcp(folder: Path, snapshot: TrainingSnapshot) -> None:
    """Load a torch.distributed.checkpoint into the parts, resharded to this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _dcp_state(snapshot)
    with warnings.catch_warnings():
        # Resuming on one process is intended (a checkpoint from N ranks, read on 1); torch
        # warns that it "assumes" so. `no_dist=True` would say it, but only from torch 2.7.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder))
    owner = _owner(snapshot)
    for name, part in snapshot.parts.items():
        if isinstance(part, torch.optim.Optimizer):
            set_optimizer_state_dict(owner, part, state[name])
        elif isinstance(part, torch.nn.Module):
            set_model_state_dict(part, state[name])


def _load_full(path: Path, snapshot: TrainingSnapshot) -> None:
    """A one-process `state/` into sharded parts: every rank reads it and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = _load_own(path)
    owner, full = _owner(snapshot), StateDictOptions(full_state_dict=True)
    names = {id(p): n for n, p in owner.named_parameters()}
    for name, part in snapshot.parts.items():
        if part is None or saved.get(name) is None:
            continue
        if isinstance(part, torch.optim.Optimizer):  # ids in the saved order -> names
            old = saved[name]
            by_name: dict[str, Any] = {"state": {}, "param_groups": []}
            for was, now in zip(old["param_groups"], part.param_groups):
                fqns = [names[id(p)] for p in now["params"]]
                for idx, fqn in zip(was["params"], fqns):
                    if idx in old["state"]:
                        by_name["state"][fqn] = old["state"][idx]
                by_name["param_groups"].append({**was, "params": fqns})
            set_optimizer_state_dict(owner, part, by_name, options=full)
        elif distributed.is_sharded(part):
            set_model_state_dict(part, saved[name], options=full)
        else:
            part.load_state_dict(saved[name])
