"""The decoder against transformers' reference models, through real checkpoint folders.

Random-weight Llama / Qwen2 / Qwen3 models are saved by transformers and loaded by r1lab
(and the reverse); logits must agree to 1e-4 in fp32. Also: KV-cache decoding and packed
sequences agree with the plain forward.
"""

from __future__ import annotations

import json

import pytest
import torch

from r1lab.model.checkpoint import load_model, save_model
from r1lab.model.config import ModelConfig
from r1lab.model.transformer import apply_rope, rms_norm, rope_inv_freq, rope_tables

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TOL = 1e-4
HF = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
# Wavelengths of head_dim 16 at theta 10000 span both sides of the llama3 band (4..16).
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LINEAR = {"rope_type": "linear", "factor": 2.0}
SHAPE = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CASES = {
    "llama-gqa-untied": dict(model_type="llama", num_key_value_heads=2, tie=False),
    "llama-mha-tied": dict(model_type="llama", num_key_value_heads=4, tie=True),
    "llama-gqa-llama3rope": dict(model_type="llama", num_key_value_heads=2, tie=False, rope=LLAMA3),
    "llama-mha-linearrope-tied": dict(
        model_type="llama", num_key_value_heads=4, tie=True, rope=LINEAR
    ),
    "llama-mqa-headdim24": dict(model_type="llama", num_key_value_heads=1, tie=False, head_dim=24),
    "qwen2-gqa-tied": dict(model_type="qwen2", num_key_value_heads=2, tie=True),
    "qwen2-mha-untied-linearrope": dict(
        model_type="qwen2", num_key_value_heads=4, tie=False, rope=LINEAR
    ),
    "qwen3-gqa-headdim32-untied": dict(
        model_type="qwen3", num_key_value_heads=2, tie=False, head_dim=32
    ),
    "qwen3-mha-tied-llama3rope": dict(
        model_type="qwen3", num_key_value_heads=4, tie=True, rope=LLAMA3
    ),
}


def hf_config(case: dict, rope_theta: float = 10000.0):
    config_cls, _ = HF[case["model_type"]]
    kwargs = dict(SHAPE, num_key_value_heads=case["num_key_value_heads"])
    kwargs["tie_word_embeddings"] = case["tie"]
    kwargs["rope_parameters"] = {
        "rope_theta": rope_theta,
        **case.get("rope", {"rope_type": "default"}),
    }
    if "head_dim" in case:
        kwargs["head_dim"] = case["head_dim"]
    if case["model_type"] == "llama":
        kwargs["attention_bias"] = False
    return config_cls(**kwargs)


def r1lab_config(case: dict) -> ModelConfig:
    return ModelConfig(
        **SHAPE,
        model_type=case["model_type"],
        num_key_value_heads=case["num_key_value_heads"],
        tie_word_embeddings=case["tie"],
        head_dim=case.get("head_dim"),
        rope_scaling=dict(case["rope"]) if "rope" in case else None,
    )


def logits_hf(model, ids, mask=None):
    """transformers' logits with positions counted over real tokens (as `generate` does)."""
    positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def max_diff(a, b, mask=None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a.float() - b.float()).abs().max().item()


def inputs(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, SHAPE["vocab_size"], (batch, length), generator=gen)


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = SHAPE["pad_token_id"], 0
    return ids, mask


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def hf_folder(request, tmp_path_factory, randomize):
    """(case, transformers model, folder it saved) for each architecture variant."""
    case = CASES[request.param]
    _, model_cls = HF[case["model_type"]]
    torch.manual_seed(0)
    model = randomize(model_cls(hf_config(case)), seed=len(request.param)).eval()
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    return case, model, folder


def test_transformers_folder_loads_with_same_logits(hf_folder):
    case, hf, folder = hf_folder
    ours = load_model(folder)
    if case["tie"]:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = inputs()
    with torch.no_grad():
        assert max_diff(ours(ids), logits_hf(hf, ids)) < TOL


def test_left_padded_batch_matches(hf_folder):
    _, hf, folder = hf_folder
    ours = load_model(folder)
    ids, mask = left_padded(inputs(batch=3), pads=[5, 0, 11])
    with torch.no_grad():
        assert max_diff(ours(ids, attention_mask=mask), logits_hf(hf, ids, mask), mask) < TOL


def test_rope_frequencies_match(hf_folder):
    _, hf, folder = hf_folder
    ours = load_model(folder)
    assert torch.allclose(ours.inv_freq, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6)


def test_r1lab_folder_opens_in_transformers(hf_folder, tmp_path, randomize):
    """Saved from a config r1lab built itself (no keys inherited from transformers)."""
    case, _, _ = hf_folder
    from r1lab.model.transformer import Transformer

    ours = randomize(Transformer(r1lab_config(case)), seed=3).eval()
    save_model(ours, tmp_path / "r1")
    written = json.loads((tmp_path / "r1" / "config.json").read_text())
    assert written["architectures"] == [HF[case["model_type"]][1].__name__]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "r1").eval()
    assert type(hf) is HF[case["model_type"]][1]
    assert hf.config.tie_word_embeddings is case["tie"]
    assert torch.allclose(ours.inv_freq, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6)
    ids, mask = left_padded(inputs(), pads=[4, 0])
    with torch.no_grad():
        assert max_diff(ours(ids), logits_hf(hf, ids)) < TOL
        assert max_diff(ours(ids, attention_mask=mask), logits_hf(hf, ids, mask), mask) < TOL


def test_llama3_rope_round_trips_through_transformers(tmp_path, random_model):
    ours = random_model(rope_scaling=dict(LLAMA3), rope_theta=500000.0, tie_word_embeddings=False)
    save_model(ours, tmp_path / "a")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    for key, value in LLAMA3.items():
        assert hf.config.rope_parameters[key] == value
    hf.save_pretrained(tmp_path / "b")  # transformers writes it back its own way
    back = ModelConfig.from_file(tmp_path / "b" / "config.json")
    assert back.rope_type == "llama3" and back.rope_theta == 500000.0
    assert {k: back.rope_scaling[k] for k in LLAMA3} == LLAMA3
    assert torch.equal(rope_inv_freq(back), ours.inv_freq)


def test_v4_style_rope_config_loads(hf_folder, tmp_path):
    """Older config.json files keep `rope_theta` and `rope_scaling` ("type") at the top."""
    _, hf, folder = hf_folder
    raw = json.loads((folder / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    scaling = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    raw["rope_scaling"] = None if scaling["type"] == "default" else scaling
    old = tmp_path / "v4"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(raw))
    (old / "model.safetensors").symlink_to(folder / "model.safetensors")
    ours = load_model(old)
    ids = inputs()
    with torch.no_grad():
        assert max_diff(ours(ids), logits_hf(hf, ids)) < TOL


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_sharded_folders_load_both_ways(model_type, tmp_path, random_model):
    ours = random_model(model_type=model_type, tie_word_embeddings=False)
    save_model(ours, tmp_path / "r1", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "r1" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not (tmp_path / "r1" / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "r1").eval()
    again = load_model(tmp_path / "r1")
    ids = inputs()
    with torch.no_grad():
        expected = ours(ids)
        assert max_diff(logits_hf(hf, ids), expected) < TOL
        assert torch.equal(again(ids), expected)

    hf.save_pretrained(tmp_path / "hf", max_shard_size=40_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert max_diff(load_model(tmp_path / "hf")(ids), expected) < TOL


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_kv_cache_decode_matches_full_forward(model_type, random_model):
    model = random_model(model_type=model_type)
    ids, mask = left_padded(inputs(batch=3, length=20), pads=[3, 0, 7])
    prompt = 12
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(batch=3, max_len=20)
        steps = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], cache=cache)]
        for start, end in [(12, 13), (13, 14), (14, 17), (17, 20)]:  # one and several tokens
            steps.append(model(ids[:, start:end], cache=cache))
    assert max_diff(torch.cat(steps, dim=1), full, mask) < TOL


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_packed_sequences_match_separate_documents(model_type, random_model):
    model = random_model(model_type=model_type)
    lengths = [[5, 9, 6], [12, 8]]
    ids = inputs(batch=2, length=20, seed=4)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        packed = model(ids, position_ids=positions)
        for row, docs in enumerate(lengths):
            start = 0
            for n in docs:
                alone = model(ids[row : row + 1, start : start + n])
                assert max_diff(packed[row : row + 1, start : start + n], alone) < TOL
                start += n


def test_packed_matches_transformers(hf_folder):
    """The same packed row through transformers, one document at a time."""
    _, hf, folder = hf_folder
    ours = load_model(folder)
    ids = inputs(batch=1, length=18, seed=5)
    positions = torch.cat([torch.arange(7), torch.arange(11)])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=positions)
        assert max_diff(packed[:, :7], logits_hf(hf, ids[:, :7])) < TOL
        assert max_diff(packed[:, 7:], logits_hf(hf, ids[:, 7:])) < TOL


def test_shared_decoder_math_matches_transformers():
    """The plain functions the model and the fast paths share (RoPE on half tables, RMSNorm)
    against transformers' own, on bf16 inputs, to the bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g).bfloat16()  # (B, heads, T, D)
    k = torch.randn(2, 2, 7, 16, generator=g).bfloat16()
    positions = torch.randint(0, 500, (2, 7), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cos, sin = rope_tables(positions, inv_freq)  # (B, T, D/2)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    hf_q, hf_k = apply_rotary_pos_emb(q.float(), k.float(), full_cos, full_sin)
    assert torch.equal(apply_rope(q, cos[:, None], sin[:, None]), hf_q.to(q.dtype))
    assert torch.equal(apply_rope(k, cos[:, None], sin[:, None]), hf_k.to(k.dtype))
    norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    assert torch.equal(rms_norm(q, norm.weight, 1e-6), norm(q))
