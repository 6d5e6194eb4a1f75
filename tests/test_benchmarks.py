"""The GPU benchmarks' scripts run on the CPU at their smallest shape, so they do not rot
between the sessions that have a GPU (their figures come from GPU runs only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_grpo_step_benchmark_runs_the_stage_update(tmp_path):
    out = tmp_path / "t.json"
    run_script("benchmarks/grpo_step.py", "--shape", "tiny", "--tools", "r1lab", "--steps", "1",
               "--checkpoint-auto", "--out", str(out), "--workdir", str(tmp_path))  # fmt: skip
    worker = json.loads(out.with_suffix(".r1lab.json").read_text())
    assert worker["checkpoint_layers"] == "auto"  # the option reached the worker process
    steps = worker["steps"]
    assert len(steps) == 2 and all(s["train_s"] > 0 and s["rollout_s"] > 0 for s in steps)
    assert all(s["mean_completion_len"] == 32 for s in steps)  # forced full length


def test_distributed_grpo_benchmark_reads_the_stage_metrics(tmp_path):
    out = tmp_path / "d.json"
    run_script("benchmarks/distributed_grpo.py", "--shape", "tiny", "--device", "cpu",
               "--runs", "1:2", "2:4", "--steps", "2", "--max-new-tokens", "8",
               "--micro-batch-size", "4", "--group-size", "4", "--work", str(tmp_path),
               "--prompt-tokens", "96", "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert report["mean_prompt_tokens"] == 96  # grpo_step.py's prompts are one length too
    import yaml  # the stage was given those questions, in the template they were sized in

    preset = yaml.safe_load((tmp_path / "tiny" / "p1x2.yaml").read_text())["grpo"]
    assert preset["template"] == "plain" and preset["tasks"][0]["name"] == "jsonl"
    assert preset["tasks"][0]["path"] == report["args"]["questions"]
    runs = report["runs"]
    assert [r["nproc"] for r in runs] == [1, 2] and all(r["status"] == "ok" for r in runs)
    assert [r["completions_per_step"] for r in runs] == [8, 16]
    for r in runs:
        assert len(r["step_s"]) == 2 and r["completions_per_s"] > 0
        parts = zip(r["rollout_s"], r["train_s"], r["step_s"])  # each rounded to 1 ms
        assert all(a + b <= s + 2e-3 for a, b, s in parts)


def test_variable_length_workload_stops_early_at_the_calibrated_rate(tmp_path):
    """The stop token's row is scaled until its mean probability is the per-token rate
    whose cut geometric lengths average 40% of the maximum; completions then stop early."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from grpo_step import stop_probability
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    p = stop_probability(1024, 0.4)
    assert (1 - (1 - p) ** 1024) / p == pytest.approx(0.4 * 1024, rel=1e-6)
    assert 1 / 470 < p < 1 / 450
    out = tmp_path / "v.json"
    run_script("benchmarks/grpo_step.py", "--shape", "tiny", "--workload", "tiny-varlen",
               "--tools", "r1lab", "--steps", "3", "--out", str(out),
               "--workdir", str(tmp_path))  # fmt: skip
    data = json.loads(out.with_suffix(".r1lab.json").read_text())
    stop = data["stop_calibration"]
    assert stop["p_reached"] == pytest.approx(stop["p"], rel=1e-3) and stop["row_scale"] > 1
    lengths = [s["mean_completion_len"] for s in data["steps"]]  # 16 completions a step
    assert 0.2 * 32 < sum(lengths) / len(lengths) < 0.7 * 32


def test_training_flops_count_the_models_own_weights_and_causal_attention():
    """The MFU numerator against the model itself: its layers' projection weights, every
    position's causal keys summed one by one, the LM head on completion tokens only; four
    forwards (reference + policy forward and backward)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from grpo_step import SHAPES, model_config, training_flops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    from r1lab.model.transformer import Transformer

    shape = SHAPES["tiny"]
    cfg = model_config(shape)
    model = Transformer(cfg)
    projections = sum(
        m.weight.numel()
        for layer in model.model.layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    )
    prompt, completion, sequences = 16, 8, 3
    length = prompt + completion
    width = cfg.num_attention_heads * cfg.head_dim
    attention = sum(4 * width * (pos + 1) for pos in range(length)) * cfg.num_hidden_layers
    head = 2 * cfg.hidden_size * cfg.vocab_size * completion
    forward = sequences * (2 * projections * length + attention + head)
    assert training_flops(shape, prompt, completion, sequences) == pytest.approx(4 * forward)
    without_kl = training_flops(shape, prompt, completion, sequences, reference=False)
    assert without_kl == pytest.approx(3 * forward)  # no reference forward when beta is 0
