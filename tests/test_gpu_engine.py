"""The GPU fast paths against the simple ones: the decode engine and the packed training path.

Marked `gpu`: skipped without CUDA. R1LAB_TEST_ENGINE_ON_CPU=1 runs the device-independent
ones on the CPU through the engine's torch ops (Triton's interpreter too, when
TRITON_INTERPRET=1), to check the logic on a machine without a GPU.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from r1lab.engine import decode_ops, fallbacks, fast_generate, fast_train, pack_attention
from r1lab.engine.decode_ops import TorchOps, TritonOps
from r1lab.engine.generate import SamplingParams, sample
from r1lab.engine.grpo_update import (
    TrainBatch,
    UpdateSettings,
    accumulate_gradients,
    micro_batches,
    sequence_logprobs,
)
from r1lab.engine.logprobs import token_logprobs
from r1lab.model.config import ModelConfig
from r1lab.model.transformer import Transformer, rope_tables
from r1lab.rl.losses import policy_loss

pytestmark = pytest.mark.gpu
ON_CPU = os.environ.get("R1LAB_TEST_ENGINE_ON_CPU") == "1"
CUDA = torch.cuda.is_available()


@pytest.fixture
def device() -> torch.device:
    if CUDA:
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs CUDA")


def cuda_only() -> None:
    if not CUDA:
        pytest.skip("needs CUDA")


def make_model(device, dtype=torch.float32, vocab=512, layers=3, eos=None, seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        rope_theta=1e6,
        pad_token_id=0,
        eos_token_id=eos,
    )
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights than the init: peakier, less tie-prone logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    return model.to(device=device, dtype=dtype).eval()


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 20, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lengths]


def reference_sample(monkeypatch, *args, **kwargs):
    monkeypatch.setenv("R1LAB_FAST_SAMPLER", "0")
    out = sample(*args, **kwargs)
    monkeypatch.delenv("R1LAB_FAST_SAMPLER")
    return out


def engine_options(device) -> dict:
    return {} if device.type == "cuda" else {"use_graphs": False}


# ---- the sampler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("split_keys", [0, 16], ids=["one-pass", "split-16"])
def test_greedy_equals_reference_fp32(device, monkeypatch, split_keys):
    """fp32 engine: the same greedy tokens, stop reasons and log-probs as the reference,
    with the attention in one pass over the cache or split into 16-key slices."""
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_KEYS", split_keys)
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_BELOW", 1 << 30)  # split at any batch
    model = make_model(device)
    prompts = random_prompts(5, 512)
    base = reference_sample(monkeypatch, model, prompts[:1], SamplingParams(0, max_new_tokens=8))
    stop = base[0].token_ids[5]  # a token the first prompt emits: some rows stop early
    params = SamplingParams(temperature=0, max_new_tokens=40, n=2, stop_token_ids=(stop,))
    ref = reference_sample(monkeypatch, model, prompts, params, max_batch_size=6)
    fast = fast_generate.fast_sample(
        model, prompts, params, max_batch_size=6, dtype=torch.float32, **engine_options(device)
    )
    assert [c.prompt_index for c in fast] == [c.prompt_index for c in ref]
    assert any(c.finish_reason == "stop" for c in ref)
    for a, b in zip(ref, fast):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3


def test_sampled_tokens_equal_reference_fp32(device, monkeypatch):
    """fp32 engine at T=0.8 with top-p: the kernels hash the same uniform from (row key,
    position) and invert the same CDF as the reference sampler, so the tokens are equal."""
    model = make_model(device)
    prompts = random_prompts(5, 512)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=24, n=3, seed=5)
    ref = reference_sample(monkeypatch, model, prompts, params)
    fast = fast_generate.fast_sample(
        model, prompts, params, max_batch_size=9, dtype=torch.float32, **engine_options(device)
    )
    assert len({tuple(c.token_ids) for c in ref}) > len(prompts)
    assert [c.token_ids for c in fast] == [c.token_ids for c in ref]


def test_dispatch_and_bf16_logprobs(device):
    """bf16 through `sample()`: greedy up to bf16 near-ties, log-probs within bf16 tolerance."""
    cuda_only()
    model = make_model(device, dtype=torch.bfloat16)
    prompts = random_prompts(6, 512)
    params = SamplingParams(temperature=0, max_new_tokens=48, n=2)
    fast = sample(model, prompts, params)
    assert fast_generate.last_stats()["decode_steps"] == 48  # it went through the engine
    _check_against_forward(model, prompts, fast, params.n, temperature=1.0, greedy=True)


def test_sampled_logprobs_bf16(device):
    cuda_only()
    model = make_model(device, dtype=torch.bfloat16)
    prompts = random_prompts(4, 512)
    params = SamplingParams(temperature=0.8, max_new_tokens=32, n=4, seed=3)
    fast = sample(model, prompts, params)
    _check_against_forward(model, prompts, fast, params.n, temperature=0.8, greedy=False)


def _check_against_forward(model, prompts, completions, n, temperature, greedy):
    """Teacher-force the engine's tokens through the model; compare log-probs and picks."""
    errs = []
    for c in completions:
        seq = prompts[c.prompt_index] + c.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([seq], device=model.device))[0].float() / temperature
        logp = torch.log_softmax(logits, -1)[len(prompts[c.prompt_index]) - 1 : -1]
        toks = torch.tensor(c.token_ids, device=model.device)
        ref_lp = logp.gather(1, toks[:, None])[:, 0]
        errs.append((ref_lp - torch.tensor(c.logprobs, device=model.device)).abs())
        if greedy:  # the pick is the argmax, up to a bf16 rounding of the logits
            gap = logp.max(-1).values - ref_lp
            assert gap.max().item() < 0.1, gap
    errs = torch.cat(errs)
    assert errs.mean().item() < 0.02 and errs.max().item() < 0.15, (errs.mean(), errs.max())


def test_sampling_distribution(device):
    """First tokens of many rows follow softmax(logits / T); same seed, same samples."""
    model = make_model(device, vocab=64)
    prompt = [[5, 9, 17, 33]]
    params = SamplingParams(temperature=0.7, max_new_tokens=2, n=4096, seed=11)
    kw = {"dtype": torch.float32, **engine_options(device)}
    out = fast_generate.fast_sample(model, prompt, params, **kw)
    first = torch.tensor([c.token_ids[0] for c in out])
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor(prompt, device=device))[0, -1].float() / 0.7, -1)
    empirical = torch.bincount(first, minlength=64).float() / len(first)
    assert 0.5 * (empirical - probs.cpu()).abs().sum().item() < 0.06
    lp = torch.tensor([c.logprobs[0] for c in out])
    assert torch.allclose(lp, probs.cpu().log()[first], atol=1e-4)
    again = fast_generate.fast_sample(model, prompt, params, **kw)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]


def test_top_k_restricts_support(device):
    model = make_model(device, vocab=64)
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=1, n=512, seed=2)
    out = fast_generate.fast_sample(model, [[1, 2, 3]], params, **engine_options(device))
    with torch.no_grad():
        top3 = model(torch.tensor([[1, 2, 3]], device=device))[0, -1].topk(3).indices.tolist()
    assert {c.token_ids[0] for c in out} <= set(top3)


# ---- the attention kernel -------------------------------------------------------------------------
def _attention_state(device, dtype, rep, head_dim, slot, max_len, rows=3, kv=2):
    """What `rope_attention` reads of an engine: random q/k/v, cache and positions. Of the
    cached keys, row 0 masks out those of the first two splits (a split with no valid key
    at all), row 1 a random fifth, row 2 none."""
    g = torch.Generator().manual_seed(slot)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cos, sin = rope_tables(torch.arange(max_len), inv_freq)
    key_ok = torch.ones(rows, max_len, dtype=torch.bool)
    key_ok[0, : 2 * (decode_ops.ATTN_SPLIT_KEYS or 32)] = False
    key_ok[1] = torch.rand(max_len, generator=g) > 0.2
    key_ok[:, slot:] = True  # as the engine holds it: the generated tokens are all keys
    cache = [torch.randn(rows, kv, max_len, head_dim, generator=g) for _ in range(2)]
    e = SimpleNamespace(
        n_heads=rep * kv, n_kv=kv, head_dim=head_dim, rows=rows, max_len=max_len, dtype=dtype,
        device=device, cos=cos.to(device), sin=sin.to(device), key_ok=key_ok.to(device),
        k_cache=[cache[0].to(device, dtype)], v_cache=[cache[1].to(device, dtype)],
        positions=torch.randint(0, max_len, (rows,), generator=g).to(device),
        slot=torch.tensor([slot], device=device), attn_partials=None,
    )  # fmt: skip
    qkv = 2 * torch.randn(rows, (rep + 2) * kv * head_dim, generator=g)  # peaky softmax
    return e, qkv.to(device, dtype)


@pytest.mark.parametrize("rep,head_dim", [(6, 128), (7, 64)])  # Qwen2.5-1.5B's and 0.5B's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split_keys", [0, 32, 24])
def test_rope_attention_kernel_equals_torch_op(
    device, monkeypatch, rep, head_dim, dtype, split_keys
):
    """The fused kernel, single pass (0) or split-K, against the torch op: the output and
    the new key and value in the cache, with the cache shorter than a split, ending on a
    split's boundary, spanning several splits (24: splits end mid-block), or full."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1")
        if dtype == torch.bfloat16:  # it takes tl.dot of bf16 on the raw bits, as integers
            pytest.skip("Triton's interpreter does not multiply bf16")
    monkeypatch.setattr(decode_ops, "ATTN_BLOCK_N", 16)
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_KEYS", split_keys)
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_BELOW", 1 << 30)  # split at any batch
    max_len, k = 100, split_keys or 32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=3e-2)
    for slot in (5, k, 2 * k, 2 * k + 7, max_len - 1):
        ref, qkv = _attention_state(device, dtype, rep, head_dim, slot, max_len)
        fused, _ = _attention_state(device, dtype, rep, head_dim, slot, max_len)
        want = torch.empty(qkv.shape[0], ref.n_heads * head_dim, device=device, dtype=dtype)
        got = torch.empty_like(want)
        TorchOps().rope_attention(ref, qkv, want, 0)
        TritonOps().rope_attention(fused, qkv, got, 0)
        assert (fused.attn_partials is not None) == bool(split_keys)
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=f"slot {slot}")
        torch.testing.assert_close(fused.k_cache[0], ref.k_cache[0])  # to an ulp (FMA)
        assert torch.equal(fused.v_cache[0], ref.v_cache[0])


# Qwen2.5-0.5B and -1.5B widths, as in benchmarks/grpo_step.py's SHAPES (full vocabulary,
# tied embeddings, no stop token), but two layers deep so the test is quick.
BENCHMARK_SHAPES = {
    "0.5b": dict(hidden=896, ffn=4864, heads=14, kv=2),
    "1.5b": dict(hidden=1536, ffn=8960, heads=12, kv=2),
}


@pytest.mark.parametrize("shape", sorted(BENCHMARK_SHAPES))
def test_fast_decode_taken_on_benchmark_shapes(shape):
    """The benchmark's shapes go through the engine with its Triton kernels and CUDA graph:
    a decline (a failed check, a missing kernel, a fallback to torch ops) fails here
    instead of quietly slowing every rollout down."""
    cuda_only()
    dims = BENCHMARK_SHAPES[shape]
    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=2,
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv"],
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda")  # fp32 master weights, as the benchmark trains
    fallbacks.forget()
    prompts = random_prompts(4, cfg.vocab_size, lo=16, hi=17)
    for params in (
        SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=0),  # the rollout
        SamplingParams(temperature=0, max_new_tokens=8),  # evaluation
    ):
        assert fast_generate.why_not(model, params) is None
        out = sample(model, prompts, params)
        assert len(out) == len(prompts) * params.n
        engine = fast_generate.engine_of(model)
        assert engine is not None, "sample() did not go through the engine"
        assert isinstance(engine.ops, TritonOps), "the engine fell back to torch ops"
        assert engine.use_graphs and engine.graphs, "the decode step was not graph-captured"
        assert fast_generate.last_stats()["decode_steps"] == params.max_new_tokens
    assert fallbacks.declines() == {}
    fast_generate.release(model)


@pytest.mark.parametrize("shape", sorted(BENCHMARK_SHAPES))
def test_fast_training_taken_on_benchmark_shapes(shape):
    """The benchmark's widths train through varlen attention and the compiled decoder layer,
    in the policy pass (fp32 master weights under bf16 autocast, checkpointed, with its
    backward) and the reference pass (bf16 weights, no grad). At the 1.5B width both once
    declined (an absolute error bound that bf16 rounding of large gradients exceeded, and
    an Inductor assertion) and the passes ran as eager elementwise kernels."""
    import copy

    cuda_only()
    dims = BENCHMARK_SHAPES[shape]
    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=1024,
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=2,
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv"],
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=True,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda").train()
    ref = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    fallbacks.forget()
    prompts = random_prompts(4, cfg.vocab_size, lo=16, hi=17)
    completions = random_prompts(4, cfg.vocab_size, lo=24, hi=40, seed=2)
    pack = fast_train.pack_rollouts(prompts, completions, device="cuda")[0]
    lp = fast_train.packed_logprobs(model, pack, checkpoint=True, amp=torch.bfloat16)
    lp.sum().backward()
    with torch.no_grad():
        ref_lp = fast_train.packed_logprobs(ref, pack, amp=torch.bfloat16)
    assert torch.isfinite(lp).all() and torch.isfinite(ref_lp).all()
    assert (lp.detach() - ref_lp).abs().max().item() < 0.5  # same weights, bf16 apart
    assert fallbacks.declines() == {}
    for m in (model, ref):
        used = [v for k, v in fast_train._COMPILED.items() if k[0] == id(m.config)]
        assert used and all(v is not None for v in used), "the decoder layer ran eagerly"


# ---- the training path ---------------------------------------------------------------------------
def _rollouts(vocab: int, n: int = 6, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    prompts = random_prompts(n, vocab, 2, 9, seed)
    completions = [
        torch.randint(1, vocab, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 30, (n,), generator=g)
    ]
    advantages = torch.randn(n, generator=g)
    return prompts, completions, advantages


def _simple_loss(model, prompts, completions, advantages, ref_lp, beta, temperature):
    """Right-padded batch, the model's own padded forward, then `policy_loss` on all of it."""
    width = max(len(c) for c in completions)
    seqs = [p + c for p, c in zip(prompts, completions)]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    attn = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    dev = model.device
    lp_all, _ = token_logprobs(model, ids.to(dev), attn.to(dev), temperature=temperature)
    lp = torch.zeros(len(seqs), width, device=dev)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        lp[i, : len(c)] = lp_all[i, len(p) - 1 : len(p) - 1 + len(c)]
    mask = fast_train.completion_mask(completions, width, device=dev)
    loss, _ = policy_loss(lp, lp.detach(), advantages.to(dev), mask, ref_logprobs=ref_lp, beta=beta)
    return loss, lp.detach()


def _fast_loss(model, prompts, completions, advantages, beta, temperature, ref_model=None, **kw):
    """The stage's own update (grpo_update) over several micro-batches; loss and stats."""
    batch = TrainBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        advantages=advantages,
        counted=[True] * len(completions),
        sampler_logprobs=[[0.0] * len(c) for c in completions],
    )
    settings = UpdateSettings(
        temperature=temperature, beta=beta, micro_batch_size=3, lm_head_chunk=7, **kw
    )
    assert len(micro_batches(batch, list(range(len(batch))), 3)) > 1  # accumulated across them
    stats = accumulate_gradients(
        model, batch, list(range(len(batch))), settings, ref_model=ref_model
    )
    return stats["loss"], batch, settings


def _rows(values: list[torch.Tensor], width: int, device) -> torch.Tensor:
    out = torch.zeros(len(values), width, device=device)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v
    return out


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters()])


def test_packed_training_equals_simple_fp32(device):
    """No autocast, padded attention: the packed path is the simple one, rearranged."""
    model = make_model(device, vocab=300).train()
    prompts, completions, adv = _rollouts(300)
    ref_model = make_model(device, vocab=300, seed=7)
    fp32 = dict(attention="sdpa", compute_dtype=torch.float32, checkpoint_layers=True)
    loss_f, batch, settings = _fast_loss(
        model, prompts, completions, adv, 0.04, 0.9, ref_model=ref_model, **fp32
    )
    g_fast = _grads(model)
    model.zero_grad(set_to_none=True)
    width = max(len(c) for c in completions)
    ref_lp = _rows(sequence_logprobs(ref_model, batch, settings), width, device)
    loss_s, lp_s = _simple_loss(model, prompts, completions, adv, ref_lp, 0.04, 0.9)
    loss_s.backward()
    g_simple = _grads(model)
    assert abs(loss_f - loss_s.item()) <= 1e-6 + 1e-5 * abs(loss_s.item())
    assert ((g_fast - g_simple).norm() / g_simple.norm()).item() < 1e-4
    lp_packed = _rows(sequence_logprobs(model, batch, settings), width, device)
    mask = fast_train.completion_mask(completions, device=device)
    assert torch.allclose(lp_packed[mask], lp_s[mask], atol=1e-5)


def test_packed_bf16_varlen_matches_simple(device):
    """fp32 master weights, bf16 autocast, FlashAttention varlen, checkpointing: same loss
    and gradients as the plain fp32 padded path within bf16 tolerance."""
    cuda_only()
    model = make_model(device, vocab=300).train()
    cfg = model.config
    opts = pack_attention._varlen_options(
        device, torch.bfloat16, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    )
    assert opts is not None, "varlen attention unavailable"
    prompts, completions, adv = _rollouts(300)
    ref_model = make_model(device, vocab=300, seed=7)
    bf16 = dict(attention="varlen", compute_dtype=torch.bfloat16, checkpoint_layers=True)
    loss_f, batch, _ = _fast_loss(
        model, prompts, completions, adv, 0.04, 1.0, ref_model=ref_model, **bf16
    )
    g_fast = _grads(model)
    model.zero_grad(set_to_none=True)
    fp32 = UpdateSettings(temperature=1.0, compute_dtype=torch.float32, attention="sdpa")
    width = max(len(c) for c in completions)
    ref_lp = _rows(sequence_logprobs(ref_model, batch, fp32), width, device)
    loss_s, _ = _simple_loss(model, prompts, completions, adv, ref_lp, 0.04, 1.0)
    loss_s.backward()
    g_simple = _grads(model)
    assert abs(loss_f - loss_s.item()) < 2e-2 * max(1.0, abs(loss_s.item()))
    cos = torch.nn.functional.cosine_similarity(g_fast, g_simple, dim=0).item()
    assert cos > 0.99, cos
    assert ((g_fast - g_simple).norm() / g_simple.norm()).item() < 0.1


def test_chunked_logprobs_gradient(device):
    """The custom backward of the chunked LM head equals autograd through full logits."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g).to(device).requires_grad_()
    w = torch.randn(50, 16, generator=g).to(device).requires_grad_()
    t = torch.randint(0, 50, (37,), generator=g).to(device)
    upstream = torch.randn(37, generator=g).to(device)
    out = fast_train.chunked_logprobs(h, w, t, temperature=0.7, chunk_size=8)
    (out * upstream).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.log_softmax((h @ w.t()) / 0.7, -1).gather(1, t[:, None])[:, 0]
    (ref * upstream).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)


def test_chunked_entropy_matches_full_softmax(device):
    """The entropy taken in the same pass as the log-probs equals the full-softmax one and
    leaves the log-probs' values and gradients unchanged."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(29, 16, generator=g).to(device).requires_grad_()
    w = torch.randn(70, 16, generator=g).to(device)
    t = torch.randint(0, 70, (29,), generator=g).to(device)
    lp, ent = fast_train.chunked_logprobs(h, w, t, temperature=0.8, chunk_size=8, with_entropy=True)
    assert not ent.requires_grad
    logp = torch.log_softmax((h @ w.t()).detach() / 0.8, -1)
    assert torch.allclose(ent, -(logp.exp() * logp).sum(-1), atol=1e-5)
    lp.sum().backward()
    grad = h.grad.clone()
    h.grad = None
    fast_train.chunked_logprobs(h, w, t, temperature=0.8, chunk_size=8).sum().backward()
    assert torch.allclose(grad, h.grad, atol=1e-6)
    assert torch.allclose(lp, logp.gather(1, t[:, None])[:, 0], atol=1e-5)


def test_new_split_scratch_drops_the_graphs_captured_over_the_old(device, monkeypatch):
    """A changed split size reallocates the attention's scratch; a graph captured over the
    old one would write into freed memory on replay, so the engine's graphs are dropped."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setattr(decode_ops, "ATTN_BLOCK_N", 16)
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_BELOW", 1 << 30)
    e, qkv = _attention_state(device, torch.float32, 6, 128, slot=40, max_len=100)
    out = torch.empty(qkv.shape[0], e.n_heads * 128, device=device)
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_KEYS", 32)
    TritonOps().rope_attention(e, qkv, out, 0)
    first = e.attn_partials
    e.graphs = {"captured": object()}
    TritonOps().rope_attention(e, qkv, out, 0)  # same split: same scratch, graphs kept
    assert e.attn_partials is first and e.graphs
    monkeypatch.setattr(decode_ops, "ATTN_SPLIT_KEYS", 24)
    TritonOps().rope_attention(e, qkv, out, 0)
    assert e.attn_partials is not first and e.graphs == {}
