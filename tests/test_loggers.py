"""Optional loggers: metrics.jsonl mirrored to TensorBoard and W&B (offline), off by default."""

from __future__ import annotations

import json
import sys

import pytest

from r1lab import cli
from r1lab.config import ConfigError, build_config
from r1lab.loggers import LoggerError, numbers
from r1lab.stages import sft
from r1lab.training import MetricsLog, read_jsonl

RECORDS = [{"step": 1, "loss": 2.5, "lr": 1e-3, "note": "x"}, {"step": 2, "loss": 2.0, "lr": 1e-3}]


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_numbers_keep_finite_numbers_only():
    assert numbers({"step": 3, "a": 1, "b": float("nan"), "c": "x", "d": True}) == {"a": 1.0}


def test_off_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("R1LAB_LOGGERS", raising=False)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(RECORDS[0])
    assert log.mirrors == [] and not (tmp_path / "tensorboard").exists()


def test_tensorboard_gets_the_metrics_jsonl_names(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", loggers=["tensorboard"])
    for r in RECORDS:
        log.write(r)
    log.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == RECORDS  # the file is unchanged
    got = scalars(tmp_path / "tensorboard")
    assert got["loss"] == [(1, 2.5), (2, 2.0)] and set(got) == {"loss", "lr"}


def test_an_sft_run_writes_tensorboard_events(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tests.test_chat_data import CHAT

    base = tmp_path / "base"
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    _micro(base)
    data = tmp_path / "chat.jsonl"
    data.write_text((json.dumps(CHAT) + "\n") * 4)
    argv = [
        "sft",
        "--out",
        str(tmp_path / "run"),
        f"model={base}",
        f"data={data}",
        "batch_size=2",
        "max_steps=2",
        "log_every=1",
        "val_examples=0",
        "loggers=[tensorboard]",
    ]
    assert cli.main(argv) == 0
    got = scalars(tmp_path / "run" / "tensorboard")
    assert "loss" in got and len(got["loss"]) == 2
    assert "loggers" not in (tmp_path / "run" / "config.yaml").read_text()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path / "metrics.jsonl", loggers=["wandb"])
    for r in RECORDS:
        log.write(r)
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_missing_packages_and_unknown_names_are_clear(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(LoggerError, match=r"pip install 'r1lab\[wandb\]'"):
        MetricsLog(tmp_path / "metrics.jsonl", loggers=["wandb"])
    with pytest.raises(ConfigError, match="unknown loggers.*tensorboard, wandb"):
        build_config(sft.Config, {"model": "m", "loggers": ["mlflow"]})
    monkeypatch.setenv("R1LAB_LOGGERS", "wandb")
    with pytest.raises(LoggerError):
        MetricsLog(tmp_path / "metrics.jsonl")
    MetricsLog(tmp_path / "samples.jsonl")  # only metrics.jsonl is mirrored


def test_loggers_leave_the_fingerprint_alone():
    a = build_config(sft.Config, {"model": "m"})
    b = build_config(sft.Config, {"model": "m", "loggers": ["tensorboard"]})
    assert a.fingerprint() == b.fingerprint() and b.loggers == ["tensorboard"]


def _micro(folder):
    from conftest import save_random_micro_model

    texts = [
        f"What is {a}+{b}? It is {a + b}. You add numbers." for a in range(30) for b in range(9)
    ]
    save_random_micro_model(folder, vocab_size=300, texts=texts)
