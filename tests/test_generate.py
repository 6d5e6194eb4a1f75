"""The cached, batched sampler against the slow no-cache reference."""

import pytest
import torch

from r1lab.engine.generate import SamplingParams, sample, sample_without_cache
from r1lab.engine.logprobs import token_logprobs
from r1lab.engine.sampling import _mix32, draw_tokens, sample_key, uniforms
from r1lab.model.config import ModelConfig
from r1lab.model.transformer import Transformer

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=3,
    )
    m = Transformer(cfg)
    with torch.no_grad():  # a peaked random model so that the stop token does get sampled
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.4)
    return m.eval()


def test_greedy_ragged_batch_matches_reference(model):
    params = SamplingParams(temperature=0, max_new_tokens=16, n=2)
    fast = sample(model, PROMPTS, params)
    slow = sample_without_cache(model, PROMPTS, params)
    assert [c.prompt_index for c in fast] == [0, 0, 1, 1, 2, 2, 3, 3]
    for a, b in zip(fast, slow):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_seeded_sampling_is_reproducible_and_logprobs_match_training_forward(model):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=12, n=3, seed=7)
    first = sample(model, PROMPTS, params)
    again = sample(model, PROMPTS, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    for c in first:
        prompt = PROMPTS[c.prompt_index]
        ids = torch.tensor([prompt + c.token_ids])
        lp, _ = token_logprobs(model, ids, temperature=0.8)
        assert torch.allclose(lp[0, len(prompt) - 1 :], torch.tensor(c.logprobs), atol=1e-5)


def test_stop_tokens_and_length_budget(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=8, seed=0)
    outs = sample(model, PROMPTS, params)
    for c in outs:
        assert 1 <= len(c.token_ids) <= 6
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == 3
        else:
            assert len(c.token_ids) == 6 and 3 not in c.token_ids
    # an explicit stop id ends sequences too
    stop = sample(model, [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=1))[
        0
    ].token_ids[0]
    forced = sample(
        model, [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(stop,))
    )
    assert forced[0].token_ids == [stop] and forced[0].finish_reason == "stop"


def test_chunked_batches_equal_one_batch(model):
    params = SamplingParams(temperature=0, max_new_tokens=10, n=2)
    whole = sample(model, PROMPTS, params)
    chunked = sample(model, PROMPTS, params, max_batch_size=2)
    assert [c.token_ids for c in whole] == [c.token_ids for c in chunked]
    assert [c.prompt_index for c in whole] == [c.prompt_index for c in chunked]


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -1), ("max_new_tokens", 0), ("n", 0)],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="prompt"):
        sample(model, [[]], SamplingParams())


# ---- counter-based draws: a row's tokens depend on its key, not on its batch ---------------
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=30, max_new_tokens=12, n=3)


def _tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def test_samples_do_not_depend_on_the_batch(model):
    """The same questions sampled in one batch, in two batches, in another order, in
    chunks, and one at a time through the no-cache reference give the same completions."""
    keys = [sample_key(7, "step", 3, q) for q in range(len(PROMPTS))]
    whole = sample(model, PROMPTS, SAMPLED, keys=keys)
    assert len({tuple(t) for t in _tokens(whole)}) > len(PROMPTS)  # the samples differ
    split = sample(model, PROMPTS[:1], SAMPLED, keys=keys[:1]) + sample(
        model, PROMPTS[1:], SAMPLED, keys=keys[1:]
    )
    assert _tokens(split) == _tokens(whole)
    order = [2, 0, 3, 1]
    shuffled = sample(model, [PROMPTS[i] for i in order], SAMPLED, keys=[keys[i] for i in order])
    by_prompt = {order[c.prompt_index]: [] for c in shuffled}
    for c in shuffled:
        by_prompt[order[c.prompt_index]].append(c.token_ids)
    assert [t for i in range(len(PROMPTS)) for t in by_prompt[i]] == _tokens(whole)
    chunked = sample(model, PROMPTS, SAMPLED, max_batch_size=3, keys=keys)
    assert _tokens(chunked) == _tokens(whole)
    reference = sample_without_cache(model, PROMPTS, SAMPLED, keys=keys)
    assert _tokens(reference) == _tokens(whole)
    for a, b in zip(reference, whole):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_default_keys_are_seed_and_prompt_index(model):
    params = SamplingParams(**{**vars(SAMPLED), "seed": 5})
    keys = [sample_key(5, i) for i in range(len(PROMPTS))]
    assert _tokens(sample(model, PROMPTS, params)) == _tokens(
        sample(model, PROMPTS, SAMPLED, keys=keys)
    )
    other = SamplingParams(**{**vars(SAMPLED), "seed": 6})
    assert _tokens(sample(model, PROMPTS, other)) != _tokens(sample(model, PROMPTS, params))
    with pytest.raises(ValueError, match="keys"):
        sample(model, PROMPTS, params, keys=keys[:2])


def test_uniforms_are_a_32_bit_hash_and_uniform():
    """The int64 tensor hash equals the 32-bit one written with Python integers (no int64
    overflow on the way), and its uniforms are flat over rows and over positions."""
    mask = 0xFFFFFFFF

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x846CA68B) & mask
        return x ^ (x >> 16)

    xs = [0, 1, mask, 0x80000000] + torch.randint(0, 2**32, (2000,)).tolist()
    assert _mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    keys = torch.tensor([sample_key(1, i) for i in range(50_000)])
    over_rows = uniforms(keys, 9)
    over_positions = uniforms(keys[:1], torch.arange(50_000))
    for u in (over_rows, over_positions):
        assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
        counts = torch.histc(u, bins=50, min=0, max=1)
        chi2 = ((counts - 1000) ** 2 / 1000).sum().item()
        assert chi2 < 100, chi2  # 49 degrees of freedom: p < 1e-4 above this
    assert torch.equal(uniforms(keys, 9), uniforms(keys, torch.tensor([9])))


def test_inverse_cdf_draw_follows_the_filtered_distribution():
    torch.manual_seed(0)
    scores = torch.randn(1, 40) * 2
    scores[0, 5] = float("-inf")
    u = uniforms(torch.tensor([sample_key("draw")]), torch.arange(20_000))
    tokens = draw_tokens(scores.expand(len(u), -1), u)
    empirical = torch.bincount(tokens, minlength=40).float() / len(tokens)
    assert empirical[5] == 0
    assert 0.5 * (empirical - scores.softmax(-1)[0]).abs().sum() < 0.02
    assert draw_tokens(scores, torch.tensor([1 - 2**-24])).item() == 39  # the last kept token
    assert draw_tokens(scores, torch.tensor([0.0])).item() == 0
