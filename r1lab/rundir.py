"""The one rule for reusing a stage run dir: reuse it, resume it, or start it over.

`r1lab <stage>` and `r1lab run` both go through here, so a settings change means the same
under either: a run dir is

- reused when its DONE marker holds the fingerprint of these settings;
- resumed when every setting that differs is one its stage declares resume-neutral (the
  stage module's `RESUME_NEUTRAL`: settings such as `save_every` or `device` that do not
  change what is computed);
- started over when any other setting differs, or (under `r1lab run`) when a stage it reads
  finished after it did, so its inputs are newer than its outputs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from r1lab.config import ConfigError
from r1lab.training import DONE_FILE, is_done

CONFIG_FILE = "config.yaml"


def resume_neutral(stage: ModuleType) -> frozenset[str]:
    """The settings a stage module declares resume-neutral (none when it declares none)."""
    return frozenset(getattr(stage, "RESUME_NEUTRAL", ()))


def changed_settings(saved: dict, now: dict, neutral: Iterable[str] = ()) -> list[str]:
    """The settings, other than resume-neutral ones, whose values differ (sorted)."""
    neutral = set(neutral)
    return sorted(
        k for k in set(saved) | set(now) if k not in neutral and saved.get(k) != now.get(k)
    )


def check_resumable(stage: str, out: Path, record: dict, settings: dict, neutral) -> None:
    """Refuse to continue a checkpoint made with other settings (naming them).

    `record` is the checkpoint's trainer record, whose `extra.config` holds the settings
    the checkpoint was trained with.
    """
    saved = record.get("extra", {}).get("config", {})
    changed = changed_settings(saved, settings, neutral)
    if changed:
        raise ConfigError(
            f"{stage}: {out} holds an unfinished run with other settings ({', '.join(changed)}); "
            "use a new --out, or --no-resume to start over there"
        )


def newer_inputs(stage_dir: Path, input_dirs: Iterable[Path]) -> list[str]:
    """Names of the input run dirs that finished after `stage_dir` did."""
    done = Path(stage_dir) / DONE_FILE
    if not done.exists():
        return []
    mine = done.stat().st_mtime_ns
    return [
        d.name
        for d in map(Path, input_dirs)
        if (d / DONE_FILE).exists() and (d / DONE_FILE).stat().st_mtime_ns > mine
    ]


@dataclass(frozen=True)
class Reuse:
    """What to do with a stage run dir: "reuse", "resume" or "restart", and why."""

    action: str
    reason: str = ""
    wipe: bool = False  # the outputs are stale as a whole: remove the run dir first

    @property
    def resume(self) -> bool:
        """The `resume` argument of the stage's `run`."""
        return self.action != "restart"


def decide_reuse(
    stage_dir: str | Path, cfg, neutral: Iterable[str] = (), input_dirs: Iterable[Path] = ()
) -> Reuse:
    """The rule of the module docstring for `cfg` (a stage Config) and `stage_dir`."""
    stage_dir = Path(stage_dir)
    stale = newer_inputs(stage_dir, input_dirs)
    if stale:
        return Reuse("restart", f"{', '.join(stale)} changed since it ran", wipe=True)
    if is_done(stage_dir, cfg.fingerprint()):
        return Reuse("reuse")
    saved_file = stage_dir / CONFIG_FILE
    if not saved_file.exists():
        return Reuse("resume")
    saved = yaml.safe_load(saved_file.read_text()) or {}
    changed = changed_settings(saved, cfg.model_dump(mode="json"), neutral)
    if changed:
        return Reuse("restart", f"settings changed since the last run ({', '.join(changed)})")
    return Reuse("resume")


# ---- the run dir itself: a usable --out, one process at a time, only r1lab's removed ----------
LOCK_FILE = ".r1lab-lock"  # held (flock) by the process writing the run dir; r1lab's marker
R1LAB_MARKERS = (LOCK_FILE, CONFIG_FILE, DONE_FILE, "eval.json", "state")


class RunDirBusy(ConfigError):
    """Another live process holds the run dir's lock."""


def check_out_dir(out: str | Path | None, flag: str = "--out") -> Path:
    """`out` as a folder this process can write, created if missing, or a one-line error."""
    if out is None or not str(out).strip():
        raise ConfigError(f"{flag} is empty; give a run directory, e.g. {flag} runs/mine")
    path = Path(out)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            what = f"{path} is a file" if parent == path else f"{parent} (above {path}) is a file"
            raise ConfigError(f"{flag} {path}: {what}, not a folder; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot create it ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: not writable (read-only file system or permissions)")
    return path


@contextmanager
def run_dir_lock(out: str | Path):
    """Hold `out`'s lock for the block; a second process gets RunDirBusy naming the holder.

    An OS lock (flock) on `out/.r1lab-lock`: the kernel drops it when its process dies, so a
    kill -9 never leaves a stale lock. The file stays as r1lab's marker of the folder.
    """
    path = Path(out) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(
                f"{out} is in use by another r1lab process (pid {holder}); wait for it to "
                "finish, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def is_r1lab_dir(folder: str | Path) -> bool:
    """Whether `folder` is empty or holds a file r1lab writes into every run dir."""
    folder = Path(folder)
    return not any(folder.iterdir()) or any((folder / m).exists() for m in R1LAB_MARKERS)


def remove_run_dir(folder: str | Path, keep_lock: bool = False) -> None:
    """Delete a stage run dir, refusing a folder r1lab did not write (a user's files)."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir() or not is_r1lab_dir(folder):
        raise ConfigError(
            f"{folder} holds files r1lab did not write (no {LOCK_FILE}, {CONFIG_FILE} or "
            f"{DONE_FILE}); not deleting it: move it away, or use another --out"
        )
    if not keep_lock:
        shutil.rmtree(folder)
        return
    for child in folder.iterdir():
        if child.name == LOCK_FILE:
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
