"""The decode engine's logic on the CPU (its torch ops, no graph), and how the fast path
says it declines. The kernels themselves are held to the reference in test_gpu_engine.py."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from r1lab.engine import fallbacks, fast_generate
from r1lab.engine.decode_ops import TorchOps
from r1lab.engine.generate import SamplingParams, sample_without_cache
from r1lab.engine.sampling import sample_key
from r1lab.model.config import ModelConfig
from r1lab.model.transformer import Transformer

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [20, 21, 22, 23]]
CPU_ENGINE = {"dtype": torch.float32, "use_triton": False, "use_graphs": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        eos_token_id=3,
        pad_token_id=0,
    )
    m = Transformer(cfg)
    with torch.no_grad():  # peaked logits: few greedy near-ties, the stop token does come up
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m.eval()


@pytest.fixture(autouse=True)
def _fresh_engines_and_declines(model):
    fallbacks.forget()
    yield
    fast_generate.release(model)
    fallbacks.forget()


def test_engine_torch_ops_greedy_equal_reference(model):
    """Prefill, the cache copied to the group's rows, stops, and the step's torch ops give
    the reference's greedy tokens, stop reasons and log-probs."""
    params = SamplingParams(temperature=0, max_new_tokens=12, n=2)
    fast = fast_generate.fast_sample(model, PROMPTS, params, max_batch_size=4, **CPU_ENGINE)
    assert isinstance(fast_generate.engine_of(model).ops, TorchOps)
    slow = sample_without_cache(model, PROMPTS, params)
    assert any(c.finish_reason == "stop" for c in slow)
    assert [c.prompt_index for c in fast] == [c.prompt_index for c in slow]
    for a, b in zip(slow, fast):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_engine_torch_ops_sample_the_reference_tokens(model):
    """Sampled rows too: the engine draws each row's token at the same uniform (its key,
    its position) by the same inverse CDF as the reference, so the tokens are equal, in
    any chunking of the batch."""
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=12, n=3)
    keys = [sample_key("engine", q) for q in range(len(PROMPTS))]
    slow = sample_without_cache(model, PROMPTS, params, keys=keys)
    assert len({tuple(c.token_ids) for c in slow}) > len(PROMPTS)
    for rows in (None, 6):
        fast = fast_generate.fast_sample(
            model, PROMPTS, params, max_batch_size=rows, keys=keys, **CPU_ENGINE
        )
        assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
        for a, b in zip(slow, fast):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p <= top_p
    return set(order[keep].tolist())


def test_top_p_nucleus_is_taken_under_the_temperature(model):
    """As in the reference sampler, the nucleus is that of softmax(logits / T), not of
    softmax(logits): at T < 1 it is smaller."""
    prompt, temperature, top_p = [5, 9, 17, 33], 0.5, 0.7
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].float()
    tempered = _nucleus(torch.softmax(logits / temperature, -1), top_p)
    untempered = _nucleus(torch.softmax(logits, -1), top_p)
    assert tempered < untempered  # otherwise this test could not tell the two apart
    params = SamplingParams(temperature, top_p=top_p, max_new_tokens=1, n=512, seed=4)
    out = fast_generate.fast_sample(model, [prompt], params, **CPU_ENGINE)
    assert {c.token_ids[0] for c in out} <= tempered


def test_declining_is_logged_once_per_reason(model, caplog, monkeypatch):
    params = SamplingParams(temperature=0, max_new_tokens=4)
    with caplog.at_level(logging.WARNING, logger="r1lab.engine"):
        for _ in range(3):
            assert not fast_generate.applicable(model, params)
        monkeypatch.setenv("R1LAB_FAST_SAMPLER", "0")
        assert not fast_generate.applicable(model, params)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "not CUDA" in lines[0] and "R1LAB_FAST_SAMPLER=0" in lines[1]
    counts = fallbacks.declines("fast decode")
    assert sorted(counts.values()) == [1, 3]


def test_head_dim_and_stop_token_reasons(model, monkeypatch):
    """The checks past the device and Triton ones, on a stand-in for a CUDA model."""

    class OnCuda:
        def __init__(self, config):
            self.config, self.device = config, torch.device("cuda")

    monkeypatch.setattr(fast_generate, "HAS_TRITON", True)
    cfg = dataclasses.replace(model.config, hidden_size=128, head_dim=32)
    assert fast_generate.why_not(OnCuda(cfg), SamplingParams()) is None
    odd = dataclasses.replace(cfg, hidden_size=192, head_dim=48)
    assert "head_dim 48" in fast_generate.why_not(OnCuda(odd), SamplingParams())
    many = SamplingParams(stop_token_ids=tuple(range(40, 60)))
    assert "21 stop tokens" in fast_generate.why_not(OnCuda(cfg), many)  # 20 + the EOS


def test_attention_is_split_only_when_the_single_pass_cannot_fill_the_gpu(monkeypatch):
    """One program per (row, KV head) over the whole cache was measured faster than any
    split at GRPO's 512 programs; with fewer programs than SMs the cache is split."""
    from r1lab.engine import decode_ops

    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_KEYS", 256)
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_BELOW", 132)  # an H200's SMs
    assert decode_ops._split_keys(256, 2, 640, "cpu") == 0  # 512 programs: one pass
    assert decode_ops._split_keys(16, 2, 4096, "cpu") == 256  # 32 programs: split
    assert decode_ops._split_keys(16, 2, 200, "cpu") == 0  # the cache fits one split
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_KEYS", 0)
    assert decode_ops._split_keys(16, 2, 4096, "cpu") == 0  # splitting turned off
    assert decode_ops.attention_partials(16, 12, 2, 128, 4096, "cpu") is None
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_KEYS", 256)
    maxes, sums, acc = decode_ops.attention_partials(16, 12, 2, 128, 4096, "cpu")
    assert maxes.shape == sums.shape == (16, 2, 16, 16) and acc.shape == (16, 2, 16, 16, 128)


def test_attention_launch_shape_follows_the_head_dim(monkeypatch):
    from r1lab.engine import decode_ops

    assert decode_ops._attention_launch(128) == decode_ops.ATTN_SHAPES[128]
    assert decode_ops._attention_launch(64) == decode_ops.ATTN_SHAPES[64]
    assert decode_ops._attention_launch(80) == (64, 2)
    monkeypatch.setattr(decode_ops, "ATTN_WARPS", 8)  # a sweep's override, at every head dim
    assert decode_ops._attention_launch(128)[1] == 8 and decode_ops._attention_launch(64)[1] == 8
