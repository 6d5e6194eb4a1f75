"""One GRPO step with LoRA against full fine-tuning: peak GPU memory and step time, one GPU.

The workload and model of `grpo_step.py` (a random Qwen2.5-shaped decoder, P prompts of L
tokens, G completions of exactly N new tokens, beta 0.001, one optimizer step per rollout,
the stage's own update `update_on_rollout`), run twice, each in its own subprocess (a
clean peak-memory counter):

- full: what `r1lab grpo` does without `lora`: fp32 master weights, AdamW state for every
  weight, a bf16 copy of the starting policy as the reference;
- lora: what `r1lab grpo ... lora={r: R, alpha: 2R}` does (r1lab.stages.grpo_lora): the base
  frozen in bf16, fp32 adapters on all seven projections of every layer (the only trainable
  parameters and optimizer state), the reference a view of the same base tensors with the
  adapters off, the sampler a view with the merged weights, refreshed before each rollout.

    python benchmarks/grpo_lora.py --shape 1.5b --steps 2 --out lora.json
    python benchmarks/grpo_lora.py --shape tiny --steps 1 --out /tmp/l.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import (  # noqa: E402 - the benchmark's shared pieces
    SHAPES,
    WORKLOADS,
    model_config,
    prompt_ids,
    steady,
    timed_step,
)


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)


def build(mode: str, cfg, dev, rank: int):
    """(policy, reference, sampler, optimizer) as `r1lab grpo` builds them in `mode`."""
    from r1lab.model.lora import LoraSettings, apply_lora, merged_view, reference_view
    from r1lab.model.transformer import Transformer
    from r1lab.training import make_optimizer

    torch.manual_seed(0)
    model = Transformer(cfg)
    compute = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if mode == "full":
        model = model.to(dev)  # fp32 master weights
        ref = copy.deepcopy(model).to(compute).eval().requires_grad_(False)
        sampler = model
    else:
        model = model.to(dev, compute)  # the frozen base, in the compute dtype
        apply_lora(model, LoraSettings(r=rank, alpha=2 * rank))
        ref, sampler = reference_view(model), merged_view(model)
    optimizer = make_optimizer(model, lr=3e-6, weight_decay=0.0, betas=(0.9, 0.999))
    return model, ref, sampler, optimizer


def worker(args) -> dict:
    from r1lab.engine import fallbacks, fast_train
    from r1lab.engine.generate import SamplingParams
    from r1lab.model.lora import refresh_merged

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, work = SHAPES[args.shape], WORKLOADS["tiny" if args.shape == "tiny" else "full"]
    cfg = model_config(shape)
    model, ref, sampler, optimizer = build(args.worker, cfg, dev, args.rank)
    p, g, n = work["prompts"], work["group"], work["new_tokens"]
    prompts_all = prompt_ids(p * (args.steps + args.warmup), work["prompt_len"], cfg.vocab_size)
    params = SamplingParams(temperature=1.0, max_new_tokens=n, n=g)
    result = {
        "mode": args.worker,
        "params": sum(t.numel() for t in model.parameters()),
        "trainable": sum(t.numel() for t in model.parameters() if t.requires_grad),
        "lora_rank": args.rank if args.worker == "lora" else None,
        "completions_per_step": p * g,
        "completion_len": n,
        "prompt_len": work["prompt_len"],
        "steps": [],
    }
    if dev.type == "cuda":
        result["allocated_after_load_gb"] = gib(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        prompts = prompts_all[step * p : (step + 1) * p]
        refresh = None if sampler is model else (lambda: refresh_merged(sampler, model))
        # as grpo_step.py: the engine's copy is not kept between steps
        record, _ = timed_step(
            args, model, sampler, optimizer, ref, prompts, params, step, refresh=refresh
        )
        result["steps"].append(record)
        print(json.dumps({"mode": args.worker, **record}), flush=True)
    result["steady"] = {
        key: round(steady([s[key] for s in result["steps"]], args.warmup), 3)
        for key in ("step_s", "rollout_s", "train_s")
    }
    result["steady"]["peak_gb"] = result["steps"][-1]["peak_gb"]
    result["declines"] = {f"{w}: {r}": c for (w, r), c in fallbacks.declines().items()}
    result["compile_check"] = {repr(k[1:]): v for k, v in fast_train.CHECK_ERRORS.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--beta", type=float, default=0.001)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="grpo_lora.json")
    ap.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args), indent=1))
        return
    results = {}
    for mode in args.modes.split(","):
        part = Path(args.out).with_suffix(f".{mode}.json")
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        cmd += ["--worker", mode, "--out", str(part)]
        done = subprocess.run(cmd, check=False)
        results[mode] = json.loads(part.read_text()) if done.returncode == 0 else None
    Path(args.out).write_text(json.dumps(results, indent=1))
    for mode, r in results.items():
        if r:
            print(mode, json.dumps({"trainable": r["trainable"], **r["steady"]}))


if __name__ == "__main__":
    main()
