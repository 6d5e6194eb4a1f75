"""The one run-dir reuse rule: `r1lab <stage>` and `r1lab run` decide alike."""

from __future__ import annotations

import pytest

from r1lab.config import ConfigError, build_config, write_config
from r1lab.rundir import changed_settings, check_resumable, decide_reuse, resume_neutral
from r1lab.stages import grpo, pretrain, reward_model, sft
from r1lab.training import mark_done


def grpo_config(**overrides) -> grpo.Config:
    return build_config(grpo.Config, {"model": "some/model", **overrides})


def test_a_resume_neutral_change_resumes_and_any_other_restarts(tmp_path):
    out = tmp_path / "r1-zero"
    out.mkdir()
    write_config(grpo_config(max_minutes=10), out / "config.yaml")
    neutral = resume_neutral(grpo)
    assert "max_minutes" in neutral

    assert decide_reuse(out, grpo_config(max_minutes=20), neutral).action == "resume"
    restart = decide_reuse(out, grpo_config(max_minutes=10, lr=1e-3), neutral)
    assert restart.action == "restart" and "lr" in restart.reason and not restart.wipe


def test_the_stage_refuses_exactly_what_the_pipeline_restarts(tmp_path):
    """A checkpoint's settings against new ones: the stage check and the pipeline's rule use
    the same comparison, so no change resumes under one and restarts under the other."""
    saved = grpo_config(max_minutes=10).model_dump(mode="json")
    record = {"extra": {"config": saved}}
    neutral = resume_neutral(grpo)
    check_resumable("grpo", tmp_path, record, grpo_config(max_minutes=30).model_dump(), neutral)
    with pytest.raises(ConfigError, match="lr"):
        check_resumable("grpo", tmp_path, record, grpo_config(lr=1e-3).model_dump(), neutral)
    assert changed_settings(saved, grpo_config(lr=1e-3).model_dump(mode="json"), neutral) == ["lr"]


def test_done_is_reused_and_a_newer_input_restarts_from_scratch(tmp_path):
    cfg = grpo_config()
    base, out = tmp_path / "base", tmp_path / "r1-zero"
    base.mkdir()
    out.mkdir()
    write_config(cfg, out / "config.yaml")
    mark_done(out, cfg.fingerprint())
    assert decide_reuse(out, cfg, resume_neutral(grpo), [base]).action == "reuse"
    mark_done(base, "x")
    later = (out / "DONE").stat().st_mtime_ns + 10**9
    import os

    os.utime(base / "DONE", ns=(later, later))
    stale = decide_reuse(out, cfg, resume_neutral(grpo), [base])
    assert stale.action == "restart" and stale.wipe and "base" in stale.reason


def test_each_stage_declares_its_neutral_settings_once():
    assert resume_neutral(pretrain) == resume_neutral(sft) == pretrain.RESUME_NEUTRAL
    assert resume_neutral(reward_model) == {"device", "log_every", "save_every"}
