"""Typed configs: YAML presets shipped in the package, overridden by `key=value` arguments.

Each stage declares its own config class (a `StageConfig` subclass at the top of its file in
`r1lab/stages/`), so a stage reads top to bottom from its settings. This module holds what
they share: strict validation, preset loading, override parsing and error messages that
name the field and what it accepts.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

C = TypeVar("C", bound="StageConfig")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and what is allowed."""


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    # mirrors of metrics.jsonl: tensorboard | wandb (optional packages; r1lab.loggers). Not
    # a training setting: left out of config.yaml and the fingerprint.
    loggers: list[str] = Field(default_factory=list, exclude=True)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("loggers", mode="before")
    @classmethod
    def _known_loggers(cls, value):
        from r1lab.loggers import check_names

        value = [value] if isinstance(value, str) else value
        return check_names(list(value or []))

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise ValueError(f"unknown dtype {value!r}; use auto, float32 or bfloat16")
        return value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """Short hash of the settings (the pipeline uses it to tell a finished stage is current)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- presets ----------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("r1lab.presets").iterdir() if p.name.endswith(".yaml")
    )


def load_preset(name_or_path: str) -> dict:
    """A preset by name (shipped in r1lab/presets) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("r1lab.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown preset {name_or_path!r}; known presets: {', '.join(preset_names())}"
            )
        text, source = res.read_text(), f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    return data


# ---- overrides --------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict:
    """`["lr=1e-5", "sampling.temperature=0.7"]` -> nested dict with YAML-typed values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (or section.key=value)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        value = _parse_value(raw)
        if isinstance(value, dict):
            value = Whole(value)  # `rewards={...}` replaces the mapping, never merges into it
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {item!r}: {part!r} is set both as a value and a section"
                )
        node[parts[-1]] = value
    return out


def _parse_value(raw: str) -> Any:
    """YAML typing, plus floats such as `3e-6` that YAML 1.1 would leave as strings."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class Whole(dict):
    """A mapping given as a whole (`key={...}` on the command line, or a preset's mapping):
    it replaces the mapping below it (a default, a preset's), where `key.sub=value` merges."""


def whole_values(section: dict) -> dict:
    """A preset section whose mapping values replace the defaults as a whole."""
    return {k: Whole(v) if isinstance(v, dict) else v for k, v in (section or {}).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Whole):
            out[key] = Whole(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: dict, cls: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        top = err["loc"][0]
        known = ", ".join(cls.model_fields) if len(err["loc"]) == 1 else ""
        hint = f"; known fields: {known}" if known else ""
        return f"unknown field {loc!r}{hint}" if top else f"unknown field {loc!r}"
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"field {loc!r}: {err['msg']}{got_text}"


def build_config(cls: type[C], *layers: dict, source: str = "config") -> C:
    """Validate the merged layers (preset, then overrides) into `cls`, or raise ConfigError."""
    # Dict-valued fields start from their defaults, so `rewards.language=0.5` adds a key
    # to the default mapping; a mapping given whole (`rewards={...}`, a preset's
    # `rewards:`; see `Whole`) replaces it.
    merged: dict = {}
    for name, info in cls.model_fields.items():
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, dict):
                merged[name] = dict(default)
    for layer in layers:
        merged = deep_merge(merged, layer or {})
    try:
        return cls.model_validate(_plain(merged))
    except ValidationError as err:
        lines = [_describe(e, cls) for e in err.errors()]
        raise ConfigError(f"{source} ({cls.__name__}): " + "; ".join(lines)) from None


def load_stage_config(cls: type[C], stage: str, preset: str | None, overrides: list[str]) -> C:
    """Config for one stage: the `stage` section of a preset, then command-line overrides."""
    base: dict = {}
    if preset:
        data = load_preset(preset)
        if stage not in data:
            raise ConfigError(
                f"preset {preset!r} has no {stage!r} section; it has: {', '.join(data) or 'nothing'}"
            )
        base = whole_values(data[stage])
    return build_config(cls, base, parse_overrides(overrides), source=f"{stage} config")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in table:
        raise ConfigError(f"dtype {name!r}: allowed values are auto, float32, bfloat16")
    return table[name]


def write_config(cfg: StageConfig, path: str | Path) -> None:
    from r1lab.model.checkpoint import atomic_write_text

    atomic_write_text(Path(path), cfg.to_yaml())


def config_dict(value: Any) -> Any:
    """JSON-friendly dump of a config (for metrics and provenance records)."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
