"""policy_loss against a slow loop-by-loop reference written from the formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from r1lab.rl import AGGREGATIONS, k3_kl, loss_normalizer, policy_loss

N, T = 6, 7
NORM_LENGTH = 9
CLIPS = {"symmetric": (0.2, None), "clip-higher": (0.2, 0.28)}


def reference_loss(
    logprobs, old, adv, mask, ref, beta, eps_low, eps_high, ratio_level, aggregation, norm_length
):
    """The objective spelled out with python loops over sequences and tokens."""
    eps_high = eps_low if eps_high is None else eps_high
    n, t_max = logprobs.shape
    seq_terms = []
    total_tokens = 0
    for i in range(n):
        tokens = [t for t in range(t_max) if mask[i, t]]
        total_tokens += len(tokens)
        if ratio_level == "sequence" and tokens:
            mean_log_ratio = sum(logprobs[i, t] - old[i, t] for t in tokens) / len(tokens)
            seq_ratio = torch.exp(mean_log_ratio)
        token_sum = 0.0
        for t in tokens:
            rho = seq_ratio if ratio_level == "sequence" else torch.exp(logprobs[i, t] - old[i, t])
            a = adv[i]
            surrogate = torch.minimum(rho * a, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a)
            term = -surrogate
            if beta > 0:
                d = ref[i, t] - logprobs[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            token_sum = token_sum + term
        seq_terms.append((token_sum, len(tokens)))
    if aggregation == "seq-mean-token-mean":
        return sum(s / max(k, 1) for s, k in seq_terms) / n
    if aggregation == "token-mean":
        return sum(s for s, _ in seq_terms) / total_tokens
    return sum(s for s, _ in seq_terms) / (n * norm_length)


def random_batch(seed: int, n: int = N, t: int = T, spread: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    logprobs = old + spread * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[1] = t  # one full row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    # garbage in the padding must never reach the loss
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, 50.0))
    return logprobs, old, adv, mask, ref


CASES = list(itertools.product(AGGREGATIONS, ("token", "sequence"), CLIPS, (0.0, 0.05)))


@pytest.mark.parametrize("aggregation,ratio_level,clip,beta", CASES)
def test_matches_reference_values_and_gradients(aggregation, ratio_level, clip, beta):
    eps_low, eps_high = CLIPS[clip]
    # wide ratios at sequence level too, so that clipping happens in both modes
    spread = 0.4 if ratio_level == "token" else 1.0
    logprobs, old, adv, mask, ref = random_batch(seed=4, spread=spread)
    kwargs = dict(
        ref_logprobs=ref,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        ratio_level=ratio_level,
        aggregation=aggregation,
        norm_length=NORM_LENGTH,
    )

    lp = logprobs.clone().requires_grad_(True)
    loss, stats = policy_loss(lp, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)

    lp_ref = logprobs.clone().requires_grad_(True)
    expected = reference_loss(
        lp_ref, old, adv, mask, ref, beta, eps_low, eps_high, ratio_level, aggregation, NORM_LENGTH
    )
    (expected_grad,) = torch.autograd.grad(expected, lp_ref)

    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert torch.all(grad[~mask] == 0)
    # the inputs exercise both sides of the clip
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0
    assert math.isclose(
        float(stats["clip_ratio/region_mean"]),
        float(stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]),
        rel_tol=1e-6,
    )


def test_clip_stats_and_kl_match_their_definitions():
    logprobs, old, adv, mask, ref = random_batch(seed=3)
    _, stats = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, eps_low=0.1, eps_high=0.3)
    ratio = torch.exp(logprobs - old)
    a = adv[:, None].expand_as(ratio)
    low = ((ratio < 0.9) & (a < 0))[mask].double().mean()
    high = ((ratio > 1.3) & (a > 0))[mask].double().mean()
    kl = k3_kl(logprobs, ref)[mask].mean()
    assert math.isclose(float(stats["clip_ratio/low_mean"]), float(low), rel_tol=1e-6)
    assert math.isclose(float(stats["clip_ratio/high_mean"]), float(high), rel_tol=1e-6)
    assert math.isclose(float(stats["kl"]), float(kl), rel_tol=1e-6)
    assert math.isclose(float(stats["ratio_mean"]), float(ratio[mask].mean()), rel_tol=1e-6)
    assert all(not v.requires_grad for v in stats.values())


SPLITS = {"1s": [1] * 6, "2s": [2, 2, 2], "3s": [3, 3], "uneven": [1, 2, 3]}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ("token", "sequence"))
def test_gradient_independent_of_micro_batch_split(aggregation, ratio_level):
    logprobs, old, adv, mask, ref = random_batch(seed=11)
    mask[4] = False  # a sequence with no tokens
    kwargs = dict(
        ref_logprobs=ref, beta=0.04, eps_high=0.28, ratio_level=ratio_level, aggregation=aggregation
    )
    full_lp = logprobs.clone().requires_grad_(True)
    full, _ = policy_loss(full_lp, old, adv, mask, norm_length=NORM_LENGTH, **kwargs)
    full.backward()

    normalizer = loss_normalizer(mask, aggregation, norm_length=NORM_LENGTH)
    for name, sizes in SPLITS.items():
        lp = logprobs.clone().requires_grad_(True)
        total = 0.0
        for rows in torch.arange(N).split(sizes):
            part, _ = policy_loss(
                lp[rows],
                old[rows],
                adv[rows],
                mask[rows],
                normalizer=normalizer,
                **{**kwargs, "ref_logprobs": ref[rows]},
            )
            part.backward()
            total = total + part.detach()
        assert torch.allclose(total, full.detach(), rtol=1e-12), name
        assert torch.allclose(lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15), name


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_padded_to_their_own_length(aggregation):
    """A trainer may trim each micro-batch's padding; a list of masks gives the normalizer."""
    logprobs, old, adv, mask, ref = random_batch(seed=5)
    full, _ = policy_loss(
        logprobs, old, adv, mask, aggregation=aggregation, norm_length=NORM_LENGTH
    )
    parts = []
    for rows in torch.arange(N).split([2, 4]):
        width = int(mask[rows].sum(dim=1).max())
        parts.append(tuple(x[rows][:, :width] for x in (logprobs, old, mask)) + (adv[rows],))
    normalizer = loss_normalizer([p[2] for p in parts], aggregation, norm_length=NORM_LENGTH)
    total = sum(
        policy_loss(lp, o, a, m, aggregation=aggregation, normalizer=normalizer)[0]
        for lp, o, m, a in parts
    )
    assert torch.allclose(total, full, rtol=1e-12)


def test_loss_normalizer_values():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert loss_normalizer(mask, "seq-mean-token-mean") == 3.0
    assert loss_normalizer(mask, "token-mean") == 3.0
    assert loss_normalizer(mask[:2, :1], "token-mean") == 2.0
    assert loss_normalizer(mask, "seq-mean-token-sum-norm", norm_length=10) == 30.0
    assert loss_normalizer([mask, mask[:1]], "token-mean") == 5.0
    assert loss_normalizer(torch.zeros(2, 3), "token-mean") == 1.0  # never divide by 0
    with pytest.raises(ValueError, match="norm_length"):
        loss_normalizer(mask, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ("token", "sequence"))
def test_empty_rows_give_no_nan(aggregation, ratio_level):
    logprobs, old, adv, mask, ref = random_batch(seed=2)
    mask[0] = False
    old[0] = -torch.inf  # padding as some engines write it
    for m in (mask, torch.zeros_like(mask)):
        lp = logprobs.clone().requires_grad_(True)
        loss, stats = policy_loss(
            lp,
            old,
            adv,
            m,
            ref_logprobs=ref,
            beta=0.1,
            ratio_level=ratio_level,
            aggregation=aggregation,
            norm_length=NORM_LENGTH,
        )
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(lp.grad).all()
        assert torch.all(lp.grad[0] == 0)
        assert all(torch.isfinite(v) for v in stats.values())
    assert loss == 0  # nothing to learn from a batch with no tokens


# ratio == 1: the loss is minus the advantage-weighted mean, a number known by hand.
# advantages (1, -1, 2, 0.5), lengths (2, 3, 1, 4), norm_length 5:
#   seq-mean-token-mean: -(1 - 1 + 2 + 0.5) / 4                = -0.625
#   token-mean:          -(2*1 - 3*1 + 1*2 + 4*0.5) / 10       = -0.3
#   seq-mean-token-sum-norm: -(2 - 3 + 2 + 2) / (4 * 5)        = -0.15
ON_POLICY = {"seq-mean-token-mean": -0.625, "token-mean": -0.3, "seq-mean-token-sum-norm": -0.15}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ("token", "sequence"))
def test_on_policy_loss_is_minus_mean_advantage(aggregation, ratio_level):
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5])
    lengths = torch.tensor([2, 3, 1, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    old = -torch.rand(4, 5)
    lp = old.clone().requires_grad_(True)
    loss, stats = policy_loss(
        lp,
        old,
        adv,
        mask,
        ref_logprobs=old,
        beta=0.5,
        ratio_level=ratio_level,
        aggregation=aggregation,
        norm_length=5,
    )
    assert math.isclose(loss.item(), ON_POLICY[aggregation], abs_tol=1e-6)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
        assert stats[key] == 0, key
    assert math.isclose(float(stats["ratio_mean"]), 1.0, abs_tol=1e-6)
    if aggregation == "seq-mean-token-mean" and ratio_level == "token":
        loss.backward()
        # d loss / d logprob_{i,t} = -A_i / (N |o_i|) at ratio 1
        expected = -adv[:, None] / (4 * lengths[:, None]) * mask
        assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_k3_kl_known_values():
    cur = torch.zeros(3)
    ref = torch.tensor([0.0, math.log(2.0), -math.log(2.0)])
    expected = torch.tensor([0.0, 2 - math.log(2) - 1, 0.5 + math.log(2) - 1])
    assert torch.allclose(k3_kl(cur, ref), expected, atol=1e-7)
    assert torch.all(k3_kl(torch.randn(100), torch.randn(100)) >= 0)


def test_low_precision_inputs_are_computed_in_float32():
    logprobs, old, adv, mask, _ = random_batch(seed=4)
    lp = logprobs.to(torch.bfloat16).requires_grad_(True)
    loss, _ = policy_loss(lp, old.to(torch.bfloat16), adv, mask)
    loss.backward()
    assert loss.dtype == torch.float32
    assert lp.grad.dtype == torch.bfloat16


def test_bad_arguments_are_named():
    logprobs, old, adv, mask, ref = random_batch(seed=1)
    with pytest.raises(ValueError, match="aggregation.*token-mean"):
        policy_loss(logprobs, old, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="ratio_level.*sequence"):
        policy_loss(logprobs, old, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logprobs, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="norm_length"):
        policy_loss(logprobs, old, adv, mask, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logprobs, old, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(logprobs, old, adv, mask, normalizer=0)
