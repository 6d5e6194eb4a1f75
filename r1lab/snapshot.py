"""The one writer and reader of a training stage's resumable checkpoint: `model/` + `state/`.

A checkpoint of a stage run dir is two folders, each written under a temporary name and
renamed into place (`r1lab.model.checkpoint.atomic_dir`), so a kill -9 never leaves half a
folder under either name:

- `model/`: the Hugging Face folder users load (weights in the export dtype, tokenizer);
- `state/`: everything a resume needs, weights included (fp32), with the optimizer and RNG.

`model/` is written first, `state/` second. `state/` is the commit point: a resume reads
the weights from `state/` alone, never from `model/`, and `state/` appears only once the
`model/` of the same step is complete. So whenever `state/` exists, `model/` exists too and
holds the run's tokenizer (pretraining trains its own and reads it back on a resume). A kill
between the two writes leaves `model/` one checkpoint ahead of `state/`; the resume replays
those steps and overwrites it, and no DONE marker exists until the last write has finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from r1lab.model.checkpoint import (
    TRAINER_STATE_NAME,
    latest_checkpoint,
    load_training_state,
    save_model,
    save_training_state,
)


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
) -> None:
    """`out/model` (the loadable folder, `model` in `export_dtype`), then `out/state`."""
    save_model(model, Path(out) / "model", tokenizer=tokenizer, dtype=export_dtype)
    save_training_state(
        Path(out) / "state",
        optimizer=snapshot,
        step=step,
        data_position=data_position,
        extra=extra,
    )


def saved_state(out: Path) -> dict | None:
    """The trainer record of the resumable checkpoint in `out`, without loading tensors."""
    folder = latest_checkpoint(out)
    if folder is None:
        return None
    return json.loads((folder / TRAINER_STATE_NAME).read_text())


def restore_checkpoint(out: Path, snapshot: TrainingSnapshot) -> dict:
    """Load the snapshot's parts and the RNG from `out/state`; return step, data_position,
    extra."""
    return load_training_state(latest_checkpoint(out), optimizer=snapshot)
