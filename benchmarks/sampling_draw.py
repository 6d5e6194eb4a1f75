"""What the counter-based draw (`r1lab/engine/sampling.py`) costs against a multinomial draw.

CPU (one thread): picking one token for 64 rows of a 151,936-token vocabulary, with and
without top-p, by `torch.multinomial` on a generator (the draw sampling used before) and
by `pick_tokens` (a hashed uniform per row, inverse CDF in token-id order); and a whole
`sample()` call on the micro model with each. CUDA (when present): the decode engine's
milliseconds per step at a Qwen2.5-0.5B width (the draw's hash runs inside the pick
kernel), sampling against greedy, and what the same hash would cost as separate torch
ops in the CUDA graph.

    python benchmarks/sampling_draw.py

Results: benchmarks/RESULTS.md (2026-11-30, the keyed sampling draw).
"""

from __future__ import annotations

import time

import torch

from r1lab.engine import fast_generate, generate
from r1lab.engine.sampling import SamplingParams, filter_logits, pick_tokens, sample_key, uniforms
from r1lab.model.config import ModelConfig, config_for_size
from r1lab.model.transformer import Transformer

_GEN = torch.Generator().manual_seed(0)


def multinomial_pick(logits, params, u):
    """The draw before keys: multinomial over the filtered softmax, from one generator."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logits = logits / params.temperature
    logprobs = torch.log_softmax(logits, -1)
    filtered = filter_logits(logits, params.top_k, params.top_p)
    tokens = torch.multinomial(filtered.softmax(-1), 1, generator=_GEN)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu() -> None:
    torch.set_num_threads(1)
    keys = torch.tensor([sample_key(0, i) for i in range(64)])
    for vocab, top_p in ((151936, 1.0), (151936, 0.95)):
        logits = torch.randn(64, vocab) * 3
        p = SamplingParams(temperature=0.7, top_p=top_p)
        old = best_of(lambda x=logits, p=p: multinomial_pick(x, p, None), 10)
        new = best_of(lambda x=logits, p=p: pick_tokens(x, p, uniforms(keys, 3)), 10)
        print(
            f"cpu pick, 64 rows x vocab {vocab}, top_p {top_p}: multinomial {old * 1e3:.1f} ms, "
            f"keyed inverse CDF {new * 1e3:.1f} ms"
        )
    print(f"cpu uniforms for 64 rows: {best_of(lambda: uniforms(keys, 3), 200) * 1e6:.0f} us")
    cfg = config_for_size("micro", vocab_size=300, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(16)]
    params = SamplingParams(temperature=1.0, max_new_tokens=64, n=8, seed=0)
    real = generate.pick_tokens
    for name, fn in (("multinomial", multinomial_pick), ("keyed inverse CDF", real)):
        generate.pick_tokens = fn
        t = best_of(lambda: generate.sample(model, prompts, params), 5)
        print(f"cpu micro model, sample() of 16 prompts x 8 x 64 tokens, {name}: {t * 1e3:.0f} ms")
    generate.pick_tokens = real


def gpu() -> None:
    cfg = ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=None, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda", torch.bfloat16).eval()
    prompts = torch.randint(3, cfg.vocab_size, (32, 128)).tolist()
    for name, params in (
        ("greedy", SamplingParams(temperature=0, max_new_tokens=256, n=8)),
        ("T=1", SamplingParams(temperature=1.0, max_new_tokens=256, n=8, seed=0)),
        ("T=1 top_p 0.95", SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=256, n=8)),
    ):
        generate.sample(model, prompts, params)  # capture the graph
        generate.sample(model, prompts, params)
        stats = fast_generate.last_stats()
        print(f"cuda 0.5b width, 256 rows, {name}: {stats['ms_per_step']:.3f} ms per decode step")
    keys = torch.tensor([sample_key(0, i) for i in range(256)], device="cuda")
    step = torch.zeros(1, dtype=torch.long, device="cuda")
    out = torch.empty(256, device="cuda")
    for _ in range(3):
        out.copy_(uniforms(keys, step))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(100):
            out.copy_(uniforms(keys, step))
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    print(f"cuda torch-op hash in a graph: {(time.perf_counter() - t0) * 1e4:.1f} us per step")


if __name__ == "__main__":
    cpu()
    if torch.cuda.is_available():
        gpu()
