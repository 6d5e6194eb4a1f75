"""The GRPO update's gradient does not depend on how a mini-batch is cut into micro-batches."""

from __future__ import annotations

import pytest
import torch

from r1lab.engine.grpo_update import (
    TrainBatch,
    UpdateSettings,
    accumulate_gradients,
    sequence_logprobs,
)
from r1lab.model.config import config_for_size
from r1lab.model.transformer import Transformer
from r1lab.rl import AGGREGATIONS

VOCAB = 64
PAD = 0


def micro_model(seed: int, randomize) -> Transformer:
    cfg = config_for_size("micro", vocab_size=VOCAB, eos_token_id=1, pad_token_id=PAD)
    return randomize(Transformer(cfg), seed=seed)


def rollout_batch(n: int = 12, seed: int = 0) -> TrainBatch:
    """Prompts and completions of varied lengths, mixed-sign advantages, one truncated row."""
    gen = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi + 1, (), generator=gen))
        return torch.randint(3, VOCAB, (length,), generator=gen).tolist()

    completions = [ids(1, 11) for _ in range(n)]
    return TrainBatch(
        prompt_ids=[ids(2, 7) for _ in range(n)],
        completion_ids=completions,
        advantages=torch.randn(n, generator=gen),
        counted=[i != 3 for i in range(n)],
        sampler_logprobs=[[0.0] * len(c) for c in completions],
    )


def gradients(model: Transformer) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


CASES = [(agg, on_policy, "token") for agg in AGGREGATIONS for on_policy in (True, False)]
CASES.append(("seq-mean-token-mean", False, "sequence"))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("aggregation, on_policy, ratio_level", CASES)
def test_gradient_is_independent_of_micro_batch_size(
    randomize, aggregation, on_policy, ratio_level, packed
):
    policy, ref, stale = (micro_model(s, randomize) for s in (0, 1, 2))
    batch = rollout_batch()
    indices = list(range(len(batch)))
    # Old log-probs from other weights: ratios away from 1, so both clip sides are exercised.
    base = dict(
        aggregation=aggregation,
        ratio_level=ratio_level,
        beta=0.04,
        eps_low=0.2,
        eps_high=0.28,
        norm_length=12,
        temperature=0.9,
        packed=packed,
        pad_id=PAD,
    )
    old = None if on_policy else sequence_logprobs(stale, batch, UpdateSettings(**base))

    results = {}
    for micro in (1, 4, 0):  # one sequence at a time, four, the whole mini-batch
        policy.zero_grad(set_to_none=True)
        stats = accumulate_gradients(
            policy,
            batch,
            indices,
            UpdateSettings(**base, micro_batch_size=micro),
            old_logprobs=old,
            ref_model=ref,
        )
        assert stats["finite"]
        results[micro] = (gradients(policy), stats)

    full_grads, full_stats = results[0]
    assert sum(g.abs().sum() for g in full_grads.values()) > 0
    for micro in (1, 4):
        grads, stats = results[micro]
        assert grads.keys() == full_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(
                g, full_grads[name], atol=1e-6, rtol=0, msg=f"{micro=}: {name}"
            )
        assert stats["loss"] == pytest.approx(full_stats["loss"], abs=1e-6)
        for key in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean"):
            assert stats[key] == pytest.approx(full_stats[key], abs=1e-6)
    if not on_policy:
        assert full_stats["clip_ratio/low_mean"] + full_stats["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("on_policy", [True, False])
def test_packed_equals_padded(randomize, on_policy):
    """Sequences laid end to end give the padded path's loss, stats and gradients."""
    policy, ref, stale = (micro_model(s, randomize) for s in (0, 1, 2))
    batch = rollout_batch(seed=3)
    base = dict(beta=0.04, eps_high=0.28, norm_length=12, temperature=0.8, pad_id=PAD)
    results = {}
    for packed in (True, False):
        settings = UpdateSettings(**base, packed=packed, micro_batch_size=5)
        old = None if on_policy else sequence_logprobs(stale, batch, settings)
        policy.zero_grad(set_to_none=True)
        stats = accumulate_gradients(
            policy, batch, list(range(len(batch))), settings, old_logprobs=old, ref_model=ref
        )
        results[packed] = (gradients(policy), stats, old)
    (g_packed, s_packed, old_packed), (g_padded, s_padded, old_padded) = results.values()
    if not on_policy:
        for a, b in zip(old_packed, old_padded):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert sum(g.abs().sum() for g in g_padded.values()) > 0
    for name, g in g_padded.items():
        torch.testing.assert_close(g_packed[name], g, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean"):
        assert s_packed[key] == pytest.approx(s_padded[key], abs=1e-5), key
    assert s_packed["tokens"] == s_padded["tokens"]


def test_masked_rows_get_no_gradient(randomize):
    """A row left out of the loss (a truncated completion under mask_truncated) adds nothing."""
    policy = micro_model(0, randomize)
    batch = rollout_batch()
    settings = UpdateSettings(aggregation="token-mean", norm_length=12, pad_id=PAD)

    policy.zero_grad(set_to_none=True)
    accumulate_gradients(policy, batch, [3], settings)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in policy.parameters())


@pytest.mark.parametrize("checkpoint, expected", [(True, 2), (False, 0), (0, 0), (1, 1), (2, 2)])
def test_recomputing_some_layers_gives_the_same_gradient(randomize, checkpoint, expected):
    """Recomputing every layer, none or the first n (`checkpoint_layers` as planned on a GPU)
    changes memory, not the loss or the gradient (the packed path, on the CPU here)."""
    from r1lab.engine import fast_train

    policy = micro_model(0, randomize)
    batch = rollout_batch(seed=4)
    pack = fast_train.pack_rollouts(batch.prompt_ids, batch.completion_ids)[0]
    recomputed = []
    real = fast_train._checkpoint

    def counting(*args, **kwargs):
        recomputed.append(1)
        return real(*args, **kwargs)

    def loss_and_grads(ckpt) -> tuple[torch.Tensor, dict]:
        policy.zero_grad(set_to_none=True)
        lp = fast_train.packed_logprobs(policy, pack, checkpoint=ckpt, compile=False)
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
        return lp.detach(), gradients(policy)

    lp_plain, g_plain = loss_and_grads(False)
    fast_train._checkpoint = counting
    try:
        lp, g = loss_and_grads(checkpoint)
    finally:
        fast_train._checkpoint = real
    assert len(recomputed) == expected == fast_train.checkpointed_layers(checkpoint, 2)
    torch.testing.assert_close(lp, lp_plain, atol=1e-6, rtol=0)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_activation_plan_keeps_the_layers_that_fit(randomize):
    """The plan recomputes the fewest layers whose kept activations fit the budget."""
    from r1lab.engine.activation_memory import activation_plan

    model = micro_model(0, randomize)  # 2 layers
    per_token, inputs, tokens = 1000.0, 100.0, 10
    floor = 2 * inputs * tokens  # both layers recomputed: their inputs only
    extra = (per_token - inputs) * tokens  # what keeping one layer whole adds
    assert activation_plan(model, tokens, floor + 2 * extra, per_token, inputs) == 0
    assert activation_plan(model, tokens, floor + 2 * extra - 1, per_token, inputs) == 1
    assert activation_plan(model, tokens, floor + extra, per_token, inputs) == 1
    assert activation_plan(model, tokens, floor + extra - 1, per_token, inputs) == 2
    assert activation_plan(model, tokens, -5.0, per_token, inputs) == 2  # nothing fits
    assert activation_plan(model, tokens, 1e18, per_token, inputs) == 0


def test_auto_checkpointing_is_planned_only_on_gpus(randomize):
    """On the CPU "auto" is left for completion_logprobs (which recomputes nothing there),
    and the update on it matches an explicit False."""
    from r1lab.engine.grpo_update import plan_activations, update_on_rollout
    from r1lab.training import make_optimizer

    results = []
    for ckpt in ("auto", False):
        policy = micro_model(0, randomize)
        optimizer = make_optimizer(policy, 1e-3)
        settings = UpdateSettings(checkpoint_layers=ckpt, micro_batch_size=4)
        assert plan_activations(policy, optimizer, rollout_batch(), settings) == settings
        results.append(update_on_rollout(policy, optimizer, rollout_batch(), settings, step=1))
    assert results[0]["loss"] == results[1]["loss"]
    assert "checkpointed_layers" not in results[0] and results[1]["checkpointed_layers"] == 0


def test_layer_probe_runs_the_packed_layer(randomize):
    """What the activation measurement runs (on CUDA) works on any model: layer 0 over a
    pack of random hidden states, with gradients, returning the pack's hidden states."""
    from r1lab.engine.activation_memory import LayerProbe

    model = micro_model(0, randomize)
    probe = LayerProbe(model, 24, "auto", False)
    y = probe.forward()
    assert y.shape == (24, model.config.hidden_size) and y.requires_grad
    (gx,) = torch.autograd.grad(y.square().sum(), probe.x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    assert probe.pack.cu_seqlens.tolist() == [0, 12, 24]


def test_activation_plan_counts_what_a_kept_layer_holds_whatever_its_tokens(randomize):
    from r1lab.engine.activation_memory import activation_plan

    model = micro_model(0, randomize)  # 2 layers
    floor, extra = 2 * 100.0 * 10, (1000.0 - 100.0) * 10
    assert activation_plan(model, 10, floor + 2 * extra, 1000.0, 100.0) == 0
    assert activation_plan(model, 10, floor + 2 * extra, 1000.0, 100.0, per_layer=1.0) == 1


def test_fewer_sequences_than_mini_batches_steps_on_each_nonempty_one(randomize):
    """A small kept batch (dynamic sampling) with more mini-batches than sequences: the
    empty mini-batches are skipped, the others step."""
    from r1lab.engine.grpo_update import update_on_rollout
    from r1lab.training import make_optimizer

    policy = micro_model(0, randomize)
    batch = rollout_batch(n=2)
    settings = UpdateSettings(mini_batches=4)
    stats = update_on_rollout(policy, make_optimizer(policy, 1e-3), batch, settings, step=1)
    assert stats["optimizer_steps"] == 2 and stats["skipped"] == 0
