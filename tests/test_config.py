"""Presets, overrides and the errors a bad config gives."""

import pytest
from pydantic import Field

from r1lab.config import (
    ConfigError,
    StageConfig,
    build_config,
    load_preset,
    parse_overrides,
    preset_names,
)


class Demo(StageConfig):
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(10, ge=1)
    tasks: dict[str, float] = Field(default_factory=lambda: {"chain_sum": 1.0})
    template: str = "r1-zero"


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["name=abc", "flag=true", "xs=[1, 2]"]) == {
        "name": "abc",
        "flag": True,
        "xs": [1, 2],
    }
    parsed = parse_overrides(["lr=3e-6", "steps=5", "tasks.math500=0.5", "template=r1-chat"])
    assert parsed == {"lr": 3e-6, "steps": 5, "tasks": {"math500": 0.5}, "template": "r1-chat"}
    cfg = build_config(Demo, {"steps": 2}, parsed)
    assert cfg.lr == 3e-6 and cfg.steps == 5
    assert cfg.tasks == {"chain_sum": 1.0, "math500": 0.5}  # sections merge key by key


def test_unknown_key_names_the_field_and_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown field 'lrr'.*known fields: .*lr"):
        build_config(Demo, parse_overrides(["lrr=1"]))


def test_wrong_type_and_range_name_the_field():
    with pytest.raises(ConfigError, match="'steps'"):
        build_config(Demo, {"steps": "many"})
    with pytest.raises(ConfigError, match="'lr'.*greater than 0"):
        build_config(Demo, {"lr": -1})


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_fingerprint_changes_with_settings():
    assert Demo().fingerprint() == Demo().fingerprint()
    assert Demo().fingerprint() != Demo(lr=2e-3).fingerprint()


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets"):
        load_preset("no-such-preset")


def test_every_shipped_preset_parses():
    for name in preset_names():
        assert isinstance(load_preset(name), dict)
