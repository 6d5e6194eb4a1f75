"""Launch shapes of the decode engine's two heaviest kernels, timed on the GPU.

The decode step's attention (RoPE + cache write + grouped-query attention, split over the
cache and combined, or in one pass) and its sampler (one pass over the vocabulary) are the
Triton kernels whose launch shapes matter most. This times each over a grid of shapes at
the benchmark's workload (Qwen2.5-0.5B dimensions, or --shape 1.5b; 256 rows, the cache
filled to the mean position of a 128 + 512 token rollout) and prints microseconds per call
and the bytes of KV cache each call must read, so the launch-shape constants at the top of
`r1lab/engine/decode_ops.py` can be set from a measurement. The attention's grid is keys
per split (0: the single pass) x keys per loop step x warps; the fastest shapes go to the
JSON's "best", which `grpo_step.py --kernel-config` applies:

    python benchmarks/decode_kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch


def time_us(fn, calls: int = 20, reps: int = 20) -> float:
    """Median GPU microseconds per call of `fn`, replayed from a CUDA graph of `calls` calls.

    Launched one at a time from Python, a kernel this small would be timed as its launch
    overhead; inside the decode step's graph it runs back to back, as here.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and allocate outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return sorted(times)[len(times) // 2]


SPLIT_ALWAYS = 1 << 30  # an ATTN_SPLIT_BELOW that splits at any number of rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("0.5b", "1.5b"), default="0.5b")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--attention-only", action="store_true", help="skip the sampler's sweep")
    args = ap.parse_args()

    from grpo_step import SHAPES, model_config  # the same model as the step benchmark

    from r1lab.engine import decode_ops
    from r1lab.engine.decode_engine import DecodeEngine
    from r1lab.model.transformer import Transformer

    dev = torch.device("cuda")
    cfg = model_config(SHAPES[args.shape], layers=1)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    rows, width = args.rows, args.prompt_len
    engine = DecodeEngine(model, rows, width + args.new_tokens)
    engine.load_weights(model)
    ids = torch.randint(4, cfg.vocab_size, (rows, width), device=dev)
    engine.prefill(ids, torch.ones_like(ids), 1)
    mean_slot = width + args.new_tokens // 2
    engine.slot.fill_(mean_slot)
    engine.positions.fill_(mean_slot)
    # keys of the earlier steps: random values in the cache
    engine.k_cache[0].normal_()
    engine.v_cache[0].normal_()
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    qkv = torch.randn(rows, qkv_out, device=dev, dtype=engine.dtype)
    out = torch.empty(rows, cfg.num_attention_heads * cfg.head_dim, device=dev, dtype=engine.dtype)
    ops = decode_ops.TritonOps()
    kv_bytes = 2 * rows * cfg.num_key_value_heads * cfg.head_dim * (mean_slot + 1) * 2
    report: dict = {"attention": [], "sample": [], "kv_bytes_per_layer": kv_bytes}
    defaults = (
        decode_ops.ATTN_SPLIT_KEYS,
        decode_ops.ATTN_SPLIT_BELOW,
        decode_ops.ATTN_BLOCK_N,
        decode_ops.ATTN_WARPS,
        decode_ops.SAMPLE_BLOCK,
        decode_ops.SAMPLE_SPLITS,
    )
    # the single pass at today's shape is the output every other shape is held to: a launch
    # shape that is fast but wrong (it does not fit, it races) is reported and never picked
    decode_ops.ATTN_SPLIT_KEYS = 0
    ops.rope_attention(engine, qkv, out, 0)
    truth = out.float().clone()
    for split_keys, block_n, warps in itertools.product((0, 128, 256), (16, 32, 64), (2, 4, 8)):
        if split_keys and block_n > split_keys:  # most of every block would be masked out
            continue
        decode_ops.ATTN_SPLIT_KEYS, decode_ops.ATTN_BLOCK_N = split_keys, block_n
        decode_ops.ATTN_WARPS = warps
        decode_ops.ATTN_SPLIT_BELOW = SPLIT_ALWAYS if split_keys else 0  # as asked, whatever rows
        shape = f"split_keys={split_keys} block_n={block_n} warps={warps}"
        try:  # a new split size reallocates the engine's scratch in the warm-up calls
            us = time_us(lambda: ops.rope_attention(engine, qkv, out, 0))
        except Exception as err:  # noqa: BLE001 - a shape that does not build
            print(f"attention {shape}: {err!r}")
            continue
        rec = {"split_keys": split_keys, "block_n": block_n, "warps": warps, "us": round(us, 2)}
        rec["gb_per_s"] = round(kv_bytes / us / 1e3)
        error = ((out.float() - truth).norm() / truth.norm()).item()
        rec["rel_error"] = float(f"{error:.2e}")
        if not error < 2e-2:  # bf16 rounding differs by split order; this is a wrong result
            print(f"attention {shape}: output off by {error:.3g} (relative); not a candidate")
            continue
        report["attention"].append(rec)
        print("attention", json.dumps(rec), flush=True)
    logits = torch.randn(rows, cfg.vocab_size, device=dev, dtype=engine.dtype)
    sample_shapes = itertools.product((1024, 2048, 4096), (8, 16, 32, 64))
    for block, splits in [] if args.attention_only else sample_shapes:
        decode_ops.SAMPLE_BLOCK, decode_ops.SAMPLE_SPLITS = block, splits
        engine.sample_stats = None
        try:
            us = time_us(lambda: ops.sample(engine, logits, None, False))
        except Exception as err:  # noqa: BLE001 - a shape that does not build
            print(f"sample block={block} splits={splits}: {err!r}")
            continue
        rec = {"block": block, "splits": splits, "us": round(us, 2)}
        report["sample"].append(rec)
        print("sample", json.dumps(rec), flush=True)
    (
        decode_ops.ATTN_SPLIT_KEYS,
        decode_ops.ATTN_SPLIT_BELOW,
        decode_ops.ATTN_BLOCK_N,
        decode_ops.ATTN_WARPS,
        decode_ops.SAMPLE_BLOCK,
        decode_ops.SAMPLE_SPLITS,
    ) = defaults
    best_a = min(report["attention"], key=lambda r: r["us"], default=None)
    best_s = min(report["sample"], key=lambda r: r["us"], default=None)
    print("fastest attention:", best_a, " fastest sampler:", best_s)
    report["best"] = {}
    if best_a:
        report["best"].update(
            ATTN_SPLIT_KEYS=best_a["split_keys"],
            ATTN_SPLIT_BELOW=SPLIT_ALWAYS if best_a["split_keys"] else 0,
            ATTN_BLOCK_N=best_a["block_n"],
            ATTN_WARPS=best_a["warps"],
        )
    if best_s:
        report["best"].update(SAMPLE_BLOCK=best_s["block"], SAMPLE_SPLITS=best_s["splits"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
