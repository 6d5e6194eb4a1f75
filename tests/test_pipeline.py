"""`r1lab run` on the micro preset: every stage, a kill mid-stage, a rerun that skips."""

import json
import os
import re

import pytest

from r1lab import pipeline
from r1lab.config import ConfigError
from r1lab.rundir import newer_inputs
from r1lab.stage_graph import stage_inputs
from r1lab.training import MetricsLog

os.environ.setdefault("R1LAB_NO_PROGRESS", "1")


class Killed(Exception):
    pass


def test_micro_pipeline_survives_a_kill_and_skips_finished_stages(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_write = MetricsLog.write

    def dying_write(self, record):
        # Die in the middle of the cold-start stage, after it has logged a few steps.
        if self.path.parent.name == "cold-start" and record.get("step", 0) >= 3:
            raise Killed
        real_write(self, record)

    monkeypatch.setattr(MetricsLog, "write", dying_write)
    with pytest.raises(Killed):
        pipeline.run_pipeline("micro", str(run_dir), jobs=1)  # in-process: the patch applies
    assert (run_dir / "base" / "DONE").exists() and (run_dir / "r1-zero" / "DONE").exists()
    assert not (run_dir / "cold-start" / "DONE").exists()
    finished_before = {s: (run_dir / s / "DONE").stat().st_mtime_ns for s in ("base", "r1-zero")}

    monkeypatch.setattr(MetricsLog, "write", real_write)
    report = pipeline.run_pipeline("micro", str(run_dir), jobs=1)

    # Finished stages were not redone; every stage finished; every model stage was evaluated.
    for stage, mtime in finished_before.items():
        assert (run_dir / stage / "DONE").stat().st_mtime_ns == mtime
    for stage in pipeline.GRAPH:
        assert (run_dir / stage.name / "DONE").exists(), stage.name
        if stage.eval_template:
            result = json.loads((run_dir / "eval" / stage.name / "eval.json").read_text())
            assert set(result["sets"]) == {"chain_sum-en", "chain_sum-zh"}
    text = report.read_text()
    for stage in pipeline.GRAPH:
        if stage.eval_template:
            assert f"| {stage.name} |" in text
    assert (run_dir / "r1-zero_curves.png").exists()

    # A third run finds everything done and only rebuilds the report.
    timings = json.loads((run_dir / "timings.json").read_text())
    pipeline.run_pipeline("micro", str(run_dir), jobs=1)
    assert json.loads((run_dir / "timings.json").read_text())["base"] == timings["base"]


def test_parallel_stages_wait_for_their_inputs(tmp_path, monkeypatch, capsys):
    """Two stages at a time, each in its own process: every stage finishes, none starts
    before its inputs have finished, the side branches overlap the main line, the console
    says what the running stages are doing, and a rerun skips everything."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(pipeline, "STATUS_EVERY_S", 0.2)
    pipeline.run_pipeline("micro", str(run_dir), jobs=2)
    console_text = capsys.readouterr().err
    assert re.search(r"^  [a-z0-9-]+: .+ — elapsed \dm\d\ds$", console_text, re.M), console_text
    timings = json.loads((run_dir / "timings.json").read_text())
    end = {
        n: t["started"] + t["seconds"] + t["eval_seconds"]
        for n, t in timings.items()
        if n[0] != "_"
    }
    for stage in pipeline.GRAPH:
        assert (run_dir / stage.name / "DONE").exists(), stage.name
        assert (run_dir / "logs" / f"{stage.name}.log").exists(), stage.name
        for upstream in stage_inputs(stage):
            assert timings[stage.name]["started"] >= end[upstream] - 0.2, (stage.name, upstream)
    overlaps = [
        (a, b) for a in end for b in end
        if a < b and timings[a]["started"] < end[b] and timings[b]["started"] < end[a]
    ]  # fmt: skip
    assert overlaps, "no two stages ran at the same time"
    done = {s.name: (run_dir / s.name / "DONE").stat().st_mtime_ns for s in pipeline.GRAPH}
    pipeline.run_pipeline("micro", str(run_dir), jobs=2)
    assert {s.name: (run_dir / s.name / "DONE").stat().st_mtime_ns for s in pipeline.GRAPH} == done


def test_unknown_stage_and_bad_override_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        pipeline.run_pipeline("micro", str(tmp_path), only="nope")
    with pytest.raises(ConfigError, match="no pipeline stage sections"):
        pipeline.run_pipeline("r1-zero", str(tmp_path))
    with pytest.raises(ConfigError, match="STAGE.key=value"):
        pipeline.run_pipeline("micro", str(tmp_path), overrides=["steps=3"])


def test_a_stage_is_out_of_date_when_an_input_finished_after_it(tmp_path):
    stage = next(s for s in pipeline.GRAPH if s.name == "rejection-sft")
    for name in ("base", "rejection", "rejection-sft"):
        (tmp_path / name).mkdir()
    for name, when in (("base", 100), ("rejection", 200), ("rejection-sft", 300)):
        (tmp_path / name / "DONE").write_text("{}")
        os.utime(tmp_path / name / "DONE", ns=(when * 10**9, when * 10**9))
    inputs = [tmp_path / n for n in stage_inputs(stage)]
    assert newer_inputs(tmp_path / stage.name, inputs) == []
    os.utime(tmp_path / "rejection" / "DONE", ns=(400 * 10**9, 400 * 10**9))  # rejection ran again
    assert newer_inputs(tmp_path / stage.name, inputs) == ["rejection"]


def test_a_stage_launched_under_torchrun_gets_its_whole_config(tmp_path, monkeypatch):
    """`r1lab run --nproc N` hands each stage its config as a preset file: the ranks read
    back the config the pipeline resolved, loggers included (left out of config.yaml and
    the fingerprint, not out of the run)."""
    import subprocess

    from r1lab.config import build_config, load_stage_config
    from r1lab.stages import sft

    cfg = build_config(
        sft.Config, {"model": "m", "data": ["d.jsonl"], "lr": 3e-4, "loggers": ["tensorboard"]}
    )
    received = []

    def call(argv):
        preset = argv[argv.index("--preset") + 1]
        received.append(load_stage_config(sft.Config, "sft", preset, []))
        return 0

    monkeypatch.setattr(subprocess, "call", call)
    pipeline.launch_stage("sft", cfg, tmp_path / "sft", True, 2)
    assert received[0].fingerprint() == cfg.fingerprint()
    assert received[0].loggers == ["tensorboard"] and received[0] == cfg


def test_pipeline_on_n_processes_launches_the_reward_model_under_torchrun(tmp_path, monkeypatch):
    """`r1lab run --nproc 2` starts reward-model as it starts the other stages (under
    torchrun, through `launch_stage`), not in the pipeline's own process."""
    from r1lab.stages import reward_model

    launched = []

    def launch(kind, cfg, out, resume, nproc):
        launched.append((kind, out, nproc, cfg.model))

    def in_process(*args, **kwargs):
        raise AssertionError("reward-model ran in the pipeline's process")

    monkeypatch.setattr(pipeline, "launch_stage", launch)
    monkeypatch.setattr(reward_model, "run", in_process)
    record = pipeline.run_stage("reward-model", "micro", str(tmp_path), {}, True, nproc=2)
    assert record.status == "done"
    assert launched == [("reward_model", tmp_path / "reward-model", 2, str(tmp_path / "base"))]
