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

from collections.abc import Iterable
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
