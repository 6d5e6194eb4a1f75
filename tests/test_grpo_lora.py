"""GRPO with LoRA: adapters alone train, the reference is the base (no copy), the sampler
runs the merged weights, the step is the formula's, and a killed run resumes identically."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from test_stage_grpo import run_killed_after_checkpoint
from test_stage_grpo import small as stage_small
from torch.func import functional_call

from r1lab.engine import grpo_update
from r1lab.model.checkpoint import load_model
from r1lab.model.lora import (
    LoraSettings,
    apply_lora,
    lora_modules,
    merged_view,
    reference_view,
    refresh_merged,
)
from r1lab.stages import grpo
from r1lab.training import read_jsonl

LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


@pytest.fixture
def spread(rewards_module):
    """The GRPO stage tests' reward that varies with the completion (groups have a spread)."""
    return f"{rewards_module}:spread"


def small(micro_dir, spread, **overrides) -> grpo.Config:
    """The GRPO stage tests' small run, with LoRA, a reward spread and a KL term."""
    settings = dict(lr=2e-2, beta=0.04, rewards={spread: 1}, lora=LORA)
    # fp32 on the CPU: the comparisons below are exact (the CUDA test is the last one)
    return stage_small(micro_dir, device="cpu", **{**settings, **overrides})


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_views_share_the_base_and_compute_base_and_merged(random_model):
    model = random_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    plain = random_model()  # the same seed: the base, separately built
    apply_lora(model, LoraSettings(**LORA))
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B, std=0.1)
    ref, sampler = reference_view(model), merged_view(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))

    assert not torch.allclose(logits(model, ids), logits(plain, ids), atol=1e-3)
    assert torch.equal(logits(ref, ids), logits(plain, ids))  # adapters off: the base exactly
    torch.testing.assert_close(logits(sampler, ids), logits(model, ids), atol=1e-5, rtol=0)
    # no second copy: the views' tensors are the policy's, except the merged layers
    ptr = {n: p.data_ptr() for n, p in model.named_parameters()}
    for name, p in ref.named_parameters():
        if not name.endswith(("lora_A", "lora_B")):
            assert p.data_ptr() == ptr[name], name
    merged = {f"{n}.weight" for n in lora_modules(model)}
    for name, p in sampler.named_parameters():
        assert (p.data_ptr() == ptr[name]) == (name not in merged), name
    assert not any(p.requires_grad for p in [*ref.parameters(), *sampler.parameters()])
    assert set(ref.state_dict()) == {k for k in model.state_dict() if "lora_" in k}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())

    with torch.no_grad():  # the adapters move: refresh the sampler; a refresh of the reference
        for module in lora_modules(model).values():
            module.lora_A.add_(0.05)
    refresh_merged(sampler, model)
    torch.testing.assert_close(logits(sampler, ids), logits(model, ids), atol=1e-5, rtol=0)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(ref, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_lora_grpo_trains_only_adapters_and_samples_merged(
    micro_dir, spread, tmp_path, monkeypatch
):
    cfg = small(micro_dir, spread)
    base = load_model(micro_dir).state_dict()
    rs = grpo.start_run(cfg, tmp_path / "run", resume=False)
    adapters = {id(p) for m in lora_modules(rs.policy).values() for p in (m.lora_A, m.lora_B)}
    trainable = [p for p in rs.policy.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == adapters
    owned = {id(p) for group in rs.optimizer.param_groups for p in group["params"]}
    assert owned == adapters  # the optimizer holds adapter state only
    # the reference is the policy's base tensors, not a copy
    policy_ptrs = {p.data_ptr() for p in rs.policy.parameters()}
    assert all(
        p.data_ptr() in policy_ptrs for n, p in rs.ref_model.named_parameters() if "lora_" not in n
    )

    seen = []
    real_collect = grpo.collect_rollout

    def watch(sampler, *args, **kwargs):  # the merged copy, refreshed after the last update
        ids = torch.tensor([[5, 9, 17, 3, 40, 2]])
        seen.append((sampler is rs.policy, logits(sampler, ids), logits(rs.policy, ids)))
        return real_collect(sampler, *args, **kwargs)

    monkeypatch.setattr(grpo, "collect_rollout", watch)
    records = [grpo.train_step(rs, cfg, step)[0] for step in (1, 2, 3)]

    assert records[0]["kl"] == 0.0  # B starts at zero: the policy is the base
    assert records[-1]["kl"] > 0 and all(r["grad_norm"] > 0 for r in records)
    assert len(seen) == 3 and not any(same for same, _, _ in seen)
    assert not torch.allclose(seen[0][1], seen[2][1], atol=1e-4)  # the adapters moved ...
    for _, sampled, adapted in seen:  # ... and the sampler followed them
        torch.testing.assert_close(sampled, adapted, atol=1e-5, rtol=0)
    state = rs.policy.state_dict()
    for name, value in base.items():  # base weights bit-identical
        assert torch.equal(state[name], value), name
    assert sum(m.lora_B.abs().sum() for m in lora_modules(rs.policy).values()) > 0


def test_lora_step_is_the_formula_against_the_frozen_base(micro_dir, spread, tmp_path, monkeypatch):
    """On a real rollout of the stage: the update's loss, KL and adapter gradients equal a slow
    reference from the GRPO formula, with the merged weights W + s B A formed explicitly and
    the reference log-probs from a separately loaded base; the adapter-free view gives the
    same KL and gradients as that loaded copy."""
    cfg = small(micro_dir, spread, temperature=0.8, eps_high=0.28)
    rs = grpo.start_run(cfg, tmp_path / "run", resume=False)
    captured = []
    monkeypatch.setattr(
        grpo, "update_on_rollout", lambda *a, **k: captured.append(a[2]) or {"skipped": 0}
    )
    grpo.train_step(rs, cfg, 1)
    batch = captured[0]
    assert len(batch) == 8 and batch.advantages.abs().sum() > 0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters away from zero: the LoRA term counts in every path
        for module in lora_modules(rs.policy).values():
            module.lora_B.copy_(0.2 * torch.randn(module.lora_B.shape, generator=gen))
    frozen = load_model(micro_dir).eval().requires_grad_(False)
    with torch.no_grad():  # old log-probs of another policy: ratios away from 1, clipping
        stale = [
            lp + 0.3 * torch.randn(lp.shape, generator=gen)
            for lp in _logprobs(frozen, batch, {}, 0.8)
        ]

    for old in (None, stale):
        expected = _slow_reference(rs.policy, frozen, batch, old, cfg)
        kls = []
        for ref in (rs.ref_model, frozen):
            for micro in (0, 3):
                settings = dataclasses.replace(rs.update, micro_batch_size=micro)
                rs.policy.zero_grad(set_to_none=True)
                stats = grpo_update.accumulate_gradients(
                    rs.policy, batch, list(range(len(batch))), settings,
                    old_logprobs=old, ref_model=ref,
                )  # fmt: skip
                assert stats["loss"] == pytest.approx(expected["loss"], abs=1e-6)
                assert stats["kl"] == pytest.approx(expected["kl"], abs=1e-7)
                kls.append(stats["kl"])
                clipped = stats["clip_ratio/low_mean"] + stats["clip_ratio/high_mean"]
                assert (clipped > 0) == (old is not None)
                for name, module in lora_modules(rs.policy).items():
                    for part in ("lora_A", "lora_B"):
                        torch.testing.assert_close(
                            getattr(module, part).grad, expected[f"{name}.{part}"],
                            atol=1e-6, rtol=1e-4, msg=f"{name}.{part} {micro=}",
                        )  # fmt: skip
        assert expected["kl"] > 0 and kls[:2] == kls[2:]  # the view's KL is the loaded copy's
    assert all(p.grad is None for p in frozen.parameters())


def _logprobs(model, batch, weights: dict, temperature: float) -> list[torch.Tensor]:
    """Each completion's token log-probs, one unpadded sequence at a time."""
    out = []
    for prompt, completion in zip(batch.prompt_ids, batch.completion_ids):
        ids = torch.tensor([prompt + completion])
        scaled = functional_call(model, weights, (ids,))[0].float() / temperature
        logp = torch.log_softmax(scaled, dim=-1)
        rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
        out.append(logp[rows, torch.tensor(completion)])
    return out


def _slow_reference(policy, frozen, batch, old, cfg) -> dict:
    """-1/N sum_i 1/|o_i| sum_t [min(rho A, clip(rho) A) - beta k3(ref, cur)] by hand."""
    adapted = lora_modules(policy)
    a = {n: m.lora_A.detach().clone().requires_grad_() for n, m in adapted.items()}
    b = {n: m.lora_B.detach().clone().requires_grad_() for n, m in adapted.items()}
    scale = cfg.lora.alpha / cfg.lora.r
    merged = {f"{n}.weight": frozen.get_submodule(n).weight + scale * b[n] @ a[n] for n in a}
    current = _logprobs(frozen, batch, merged, cfg.temperature)
    with torch.no_grad():
        reference = _logprobs(frozen, batch, {}, cfg.temperature)
    total, kl_sum, tokens = 0.0, 0.0, 0
    high = cfg.eps_high if cfg.eps_high is not None else cfg.eps_low
    for i, (lp, ref) in enumerate(zip(current, reference)):
        if not batch.counted[i]:
            continue
        before = lp.detach() if old is None else old[i]
        ratio = torch.exp(lp - before)
        adv = batch.advantages[i]
        surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - cfg.eps_low, 1 + high) * adv)
        k3 = torch.exp(ref - lp) - (ref - lp) - 1
        total = total + (surrogate - cfg.beta * k3).mean()
        kl_sum += float(k3.detach().sum())
        tokens += len(lp)
    loss = -total / len(batch)
    loss.backward()
    out = {"loss": float(loss.detach()), "kl": kl_sum / tokens}
    for n in a:
        out[f"{n}.lora_A"], out[f"{n}.lora_B"] = a[n].grad, b[n].grad
    return out


def test_lora_run_saves_adapters_and_resumes_identically(micro_dir, spread, tmp_path, monkeypatch):
    """A kill after step 3's checkpoint (the reference refreshed to the policy at step 3):
    the resumed run restores adapters, optimizer and reference adapters and ends where the
    uninterrupted one does; model/ is the merged model, adapter/ the PEFT adapters."""
    cfg = small(micro_dir, spread, steps=4, save_every=3, ref_refresh_every=2)
    grpo.run(cfg, tmp_path / "whole")
    run_killed_after_checkpoint(cfg, tmp_path / "killed", 3, monkeypatch)
    state = torch.load(tmp_path / "killed" / "state" / "optimizer.pt", weights_only=True)
    assert set(state["policy"]) == set(state["ref"])  # adapters only, no base weights
    assert state["policy"] and all(k.endswith(("lora_A", "lora_B")) for k in state["policy"])
    assert len(state["optimizer"]["state"]) == len(state["policy"])
    started = []
    real_step = grpo.train_step
    monkeypatch.setattr(
        grpo, "train_step", lambda rs, c, step: started.append(step) or real_step(rs, c, step)
    )
    grpo.run(cfg, tmp_path / "killed")

    assert started == [4]
    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for key in ("reward", "kl", "loss", "grad_norm", "eval/pass@1"):
        assert [r.get(key) for r in whole] == [r.get(key) for r in resumed], key
    assert whole[-1]["kl"] > 0
    for run in ("whole", "killed"):
        assert (tmp_path / run / "adapter" / "adapter_config.json").is_file()
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # model/ = base + (alpha / r) B A on the targeted layers, the base elsewhere
    config = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    base = load_model(micro_dir).state_dict()
    merged = load_model(tmp_path / "whole" / "model").state_dict()
    again = load_model(tmp_path / "killed" / "model").state_dict()
    for name, value in base.items():
        assert torch.equal(merged[name], again[name]), name
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in a:
            delta = 2.0 * a[f"{key}.lora_B.weight"] @ a[f"{key}.lora_A.weight"]
            torch.testing.assert_close(merged[name], value + delta, atol=1e-6, rtol=0)
            assert not torch.equal(merged[name], value)
        else:
            assert torch.equal(merged[name], value), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_grpo_on_cuda(micro_dir, spread, tmp_path, monkeypatch):
    """The CUDA paths: bf16 base, compiled packed layers with adapters, the Triton LM head
    with a frozen head, the decode engine on the merged view."""
    cfg = small(micro_dir, spread, device="cuda", steps=2)
    base = load_model(micro_dir, dtype=torch.bfloat16).state_dict()
    rs = grpo.start_run(cfg, tmp_path / "run", resume=False)
    records = [grpo.train_step(rs, cfg, step)[0] for step in (1, 2)]
    assert records[0]["kl"] < 1e-3 and records[1]["grad_norm"] > 0  # B = 0: rounding only
    assert records[0]["rollout/logprob_diff"] < 0.1  # bf16 engine against bf16 training
    state = rs.policy.state_dict()
    assert all(torch.equal(state[k], v.cuda()) for k, v in base.items())
    grpo.grpo_lora.refresh_sampler(rs.sampler, rs.policy)
    ids = torch.tensor([[5, 9, 17, 3, 40, 2]], device="cuda")
    torch.testing.assert_close(
        logits(rs.sampler, ids).float(), logits(rs.policy, ids).float(), atol=0.1, rtol=0
    )
