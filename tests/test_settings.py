"""Settings are discoverable: `r1lab STAGE --help` lists them, `r1lab config STAGE` prints them."""

from __future__ import annotations

import importlib

import pytest
import yaml

from r1lab import cli
from r1lab.settings import settings_rows
from r1lab.stage_graph import STAGE_COMMANDS


def test_grpo_help_lists_group_size_with_default_and_description(capsys):
    with pytest.raises(SystemExit):
        cli.main(["grpo", "--help"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("group_size"))
    assert "int = 8" in line
    assert "completions sampled per question" in out


@pytest.mark.parametrize("stage", list(STAGE_COMMANDS))
def test_every_setting_has_type_default_and_description(stage):
    module = importlib.import_module(f"r1lab.stages.{STAGE_COMMANDS[stage][0]}")
    rows = settings_rows(module.Config)
    assert [r[0] for r in rows] == list(module.Config.model_fields)
    undocumented = [name for name, _, _, description in rows if not description]
    assert not undocumented, f"{stage}: {undocumented}"


def test_other_commands_do_not_import_stage_settings():
    assert cli._help_for(["grpo", "--out", "x"]) is None
    assert cli._help_for(["--debug", "sft", "-h"]) == "sft"


def test_config_prints_yaml_that_round_trips(tmp_path, capsys):
    assert cli.main(["config", "grpo", "model=org/name", "group_size=4"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)["grpo"]
    assert data["group_size"] == 4 and data["model"] == "org/name"
    assert "# int: completions sampled per question" in text
    saved = tmp_path / "mine.yaml"
    saved.write_text(text)
    assert cli.main(["config", "grpo", "--preset", str(saved)]) == 0
    assert capsys.readouterr().out == text


def test_config_takes_overrides_after_preset_as_the_docs_write_it(capsys):
    # docs/researchers.md: r1lab config grpo --preset r1-zero group_size=16 > my.yaml
    assert cli.main(["config", "grpo", "--preset", "r1-zero", "group_size=16"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["grpo"]
    assert data["group_size"] == 16 and data["lr"] == 3e-6  # the preset's lr, kept
    with pytest.raises(SystemExit):  # an unknown flag is still an error
        cli.main(["config", "grpo", "--preset", "r1-zero", "--bogus", "group_size=16"])
    # the same for every command with overrides: those on both sides of a flag, in order
    assert cli.main(["config", "grpo", "group_size=4", "--preset", "r1-zero", "group_size=16"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["grpo"]["group_size"] == 16


def test_config_leaves_a_required_model_empty_and_says_so(capsys):
    assert cli.main(["config", "sft"]) == 0
    text = capsys.readouterr().out
    assert "(required: fill it in)" in text
    assert yaml.safe_load(text)["sft"]["model"] == ""
