"""Which fast paths the packed training pass takes at the benchmark's shapes, and their speed.

For each shape (full width and vocabulary, `--layers` deep): the varlen attention call
chosen, whether the compiled decoder layer is used (and its error against an fp32 layer,
beside the eager bf16 layer's), every fast path that declined, and the time of a policy
pass (forward + backward, checkpointed) and of a reference pass (bf16 weights, no grad)
over one micro-batch of the benchmark's sequences, compiled and eager.

    python benchmarks/train_paths.py --shapes 0.5b,1.5b --out paths.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import SHAPES, model_config, prompt_ids  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def probe(shape: str, layers: int, seqs: int) -> dict:
    from r1lab.engine import fallbacks, fast_train, pack_attention
    from r1lab.model.transformer import Transformer

    fallbacks.forget()
    fast_train._COMPILED.clear()
    torch.manual_seed(0)
    cfg = model_config(SHAPES[shape], layers=layers)
    model = Transformer(cfg).cuda().train()
    ref = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    prompts = prompt_ids(seqs, 128, cfg.vocab_size)
    completions = prompt_ids(seqs, 512, cfg.vocab_size, seed=1)
    pack = fast_train.pack_rollouts(prompts, completions, max_tokens=2**62, device="cuda")[0]
    out: dict = {"shape": shape, "layers": layers, "tokens": pack.num_tokens}
    out["varlen"] = repr(
        pack_attention._varlen_options(
            torch.device("cuda"), torch.bfloat16, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim,
        )
    )  # fmt: skip

    def policy(compile_):
        def run():
            lp = fast_train.packed_logprobs(
                model, pack, checkpoint=True, amp=torch.bfloat16, compile=compile_
            )
            lp.sum().backward()
            model.zero_grad(set_to_none=True)

        return run

    def reference(compile_):
        @torch.no_grad()
        def run():
            fast_train.packed_logprobs(ref, pack, amp=torch.bfloat16, compile=compile_)

        return run

    for name, fn in (("policy", policy), ("reference", reference)):
        for compile_ in (True, False):
            key = f"{name}_{'compiled' if compile_ else 'eager'}_s"
            try:
                out[key] = round(timed(fn(compile_)), 4)
            except Exception as exc:  # noqa: BLE001 - report, go on
                out[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["compiled_layers_cached"] = {
        repr(k[1:]): v is not None for k, v in fast_train._COMPILED.items()
    }
    out["declines"] = {f"{p}: {r}": n for (p, r), n in fallbacks.declines().items()}
    try:
        from torch._dynamo.utils import counters

        out["dynamo_recompiles"] = dict(counters["recompiles"])
        out["dynamo_frames"] = dict(counters["frames"])
    except ImportError:
        pass
    out["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.5b,1.5b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--out")
    args = ap.parse_args()
    results = []
    for shape in args.shapes.split(","):
        results.append(probe(shape, args.layers, args.seqs))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
