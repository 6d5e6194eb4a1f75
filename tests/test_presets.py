"""Every shipped pipeline preset validates; the real-checkpoint recipe runs on a reduced model."""

import os

import pytest
import torch

from r1lab import pipeline
from r1lab.config import build_config, load_preset
from r1lab.model.checkpoint import save_model
from r1lab.model.config import ModelConfig
from r1lab.model.tokenizer import train_tokenizer
from r1lab.model.transformer import Transformer
from r1lab.stages import grpo

os.environ.setdefault("R1LAB_NO_PROGRESS", "1")
PIPELINE_PRESETS = ("tiny", "micro", "qwen2.5-math-1.5b")


def stage_configs(preset_name: str) -> dict:
    """Every stage's validated config (upstream dirs stand in for the wiring)."""
    preset = load_preset(preset_name)
    configs = {}
    for stage in pipeline.GRAPH:
        wiring = {}
        if stage.model_from:
            wiring["model"] = f"runs/x/{stage.model_from}"
        if stage.reward_model_from:
            wiring["reward_model"] = f"runs/x/{stage.reward_model_from}"
        module = pipeline.stage_module(stage.kind)
        configs[stage.name] = build_config(
            module.Config, preset.get(stage.name, {}), wiring, source=stage.name
        )
    configs["eval"] = build_config(
        pipeline.stage_module("evaluate").Config, preset["eval"], {"model": "runs/x/base"}
    )
    return configs


@pytest.mark.parametrize("name", PIPELINE_PRESETS)
def test_pipeline_preset_validates(name):
    configs = stage_configs(name)
    assert set(configs) == set(pipeline.STAGE_NAMES) | {"eval"}


def test_real_recipe_settings_are_the_papers():
    cfg = stage_configs("qwen2.5-math-1.5b")
    zero = cfg["r1-zero"]
    assert (zero.lr, zero.beta, zero.group_size, zero.temperature) == (3e-6, 0.001, 16, 1.0)
    assert zero.questions_per_step // zero.mini_batches == 32  # questions per optimizer step
    assert zero.ref_refresh_every * zero.mini_batches == 400  # optimizer steps between refreshes
    assert cfg["reasoning-rl"].eps_low == 10.0
    assert cfg["eval"].temperature == 0.6 and cfg["eval"].top_p == 0.95 and not cfg["eval"].greedy


def test_real_recipe_grpo_runs_on_a_reduced_qwen2(tmp_path, shared_data_dir):
    """The qwen2.5-math-1.5b r1-zero settings on a random Qwen2 of reduced size, MATH-500 data."""
    tok = train_tokenizer(
        ["Question: What is 1+1? <think> 1+1=2 </think> <answer> 2 </answer>"] * 50, vocab_size=300
    )
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="qwen2",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    save_model(Transformer(config), tmp_path / "qwen2-reduced", tokenizer=tok)

    section = dict(load_preset("qwen2.5-math-1.5b")["r1-zero"])
    data = {"options": {"path": str(shared_data_dir / "math500.jsonl")}}
    reduced = {
        "model": str(tmp_path / "qwen2-reduced"),
        "tasks": [{"name": "math500", "weight": 1.0, **data}],
        "eval_task": {"name": "math500", **data},
        "questions_per_step": 2,
        "mini_batches": 1,
        "group_size": 4,
        "max_new_tokens": 12,
        "steps": 2,
        "micro_batch_size": 3,
        "eval_n": 2,
        "eval_k": 2,
        "eval_max_new_tokens": 12,
        "save_every": 1,
    }
    cfg = build_config(grpo.Config, section, reduced)
    assert cfg.beta == 0.001 and cfg.group_size == 4
    summary = grpo.run(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "model" / "config.json").exists()
