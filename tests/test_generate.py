"""The cached, batched sampler against the slow no-cache reference."""

import pytest
import torch

from r1lab.engine.generate import SamplingParams, sample, sample_without_cache
from r1lab.engine.logprobs import token_logprobs
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
