"""One GRPO step, r1lab against TRL's GRPOTrainer (no vLLM), same model shape and work, one GPU.

Both tools train a randomly initialised Qwen2.5-shaped decoder (no hub access) on the same
workload: P prompts of L tokens, G completions each of exactly N new tokens (stop tokens
are disabled in r1lab and TRL gets `min_new_tokens=N`, so both always do full-length
work), KL coefficient beta, one optimizer step per rollout, fp32 master weights with bf16
compute, gradient clipping at 1.0. r1lab's training half is `r1lab grpo`'s own update
(`r1lab.engine.grpo_update.update_on_rollout`: reference pass, packed policy forward and
backward per micro-batch of `--micro-batch-size` sequences, optimizer step). Each tool runs in its own subprocess (a clean GPU and
a clean peak-memory counter), one after the other, inside one invocation:

    python benchmarks/grpo_step.py --shape 0.5b --out run.json            # both tools
    python benchmarks/grpo_step.py --shape 1.5b --tools r1lab --out r.json
    python benchmarks/grpo_step.py --shape tiny --steps 1 --out /tmp/t.json  # CPU smoke
    python benchmarks/grpo_step.py --append-results run.json              # -> RESULTS.md

Every tool prints one JSON line per step as it goes, and its JSON file is rewritten after
each step, so a run cut short still leaves its numbers. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
SHAPES = {
    # Qwen2.5-0.5B and -1.5B dimensions; "tiny" is a CPU smoke test of the script itself.
    "0.5b": dict(hidden=896, ffn=4864, layers=24, heads=14, kv=2, vocab=151936),
    "1.5b": dict(hidden=1536, ffn=8960, layers=28, heads=12, kv=2, vocab=151936),
    # Qwen2.5-7B: an untied LM head (distributed_grpo.py; too large for one GPU's GRPO step)
    "7b": dict(hidden=3584, ffn=18944, layers=28, heads=28, kv=4, vocab=152064, tied=False),
    "tiny": dict(hidden=64, ffn=128, layers=2, heads=4, kv=2, vocab=1024),
}
WORKLOADS = {
    "full": dict(prompts=32, prompt_len=128, group=8, new_tokens=512),
    # completions end at the stop token after about 40% of the maximum on average, as in
    # real RL where most answers stop early (`stop_fraction`, see calibrate_stop)
    "varlen": dict(prompts=32, prompt_len=128, group=8, new_tokens=1024, stop_fraction=0.4),
    "tiny": dict(prompts=4, prompt_len=16, group=4, new_tokens=32),
    "tiny-varlen": dict(prompts=4, prompt_len=16, group=4, new_tokens=32, stop_fraction=0.4),
}
BOS, EOS, PAD, FIRST_ID = 0, 1, 2, 4


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb() -> float | None:
    return (
        round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    )


def prompt_ids(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ID, vocab, (count, length), generator=g).tolist()


def steady(values: list[float], warmup: int) -> float:
    rest = values[warmup:] or values
    return sum(rest) / len(rest)


# ---- the variable-length workload ---------------------------------------------------------------
def stop_probability(max_new: int, fraction: float) -> float:
    """The per-token stop probability p whose completions, cut at `max_new`, average
    `fraction * max_new` tokens: E[min(G, N)] = (1 - (1 - p)^N) / p for a geometric G."""
    lo, hi = 1e-9, 1.0
    for _ in range(100):  # the mean length falls as p grows
        mid = (lo + hi) / 2
        mean = (1 - (1 - mid) ** max_new) / mid
        lo, hi = (mid, hi) if mean > fraction * max_new else (lo, mid)
    return (lo + hi) / 2


@torch.no_grad()
def calibrate_stop(hidden: torch.Tensor, weight: torch.Tensor, stop_id: int, p: float) -> dict:
    """Scale the stop token's row of the output weight (tied: its embedding too) so that at
    temperature 1 it is sampled with mean probability `p` over `hidden`'s positions.

    A random model's next-token distribution is close to uniform (about 1 / vocab for the
    stop token); scaling its row by a widens its logit's spread, and the mean probability
    grows with a. `hidden` are final hidden states of random tokens (never the stop token,
    so the scaled embedding does not move them). Each tool's model is calibrated on its
    own weights to the same p, so both sample completions of the same expected length.
    """
    h = hidden.float()
    row = weight[stop_id].float()
    rest = torch.cat((weight[:stop_id], weight[stop_id + 1 :])).float()
    others = torch.logsumexp(h @ rest.T, dim=-1)  # the other tokens' normaliser, per position
    own = h @ row

    def mean_p(a: float) -> float:
        logit = a * own
        return float(torch.exp(logit - torch.logaddexp(logit, others)).mean())

    lo, hi = 0.0, 1.0
    while mean_p(hi) < p and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_p(mid) < p else (lo, mid)
    scale = (lo + hi) / 2
    weight[stop_id].mul_(scale)
    return {"stop_id": stop_id, "row_scale": round(scale, 4), "p": p, "p_reached": mean_p(scale)}


def calibration_ids(vocab: int, stop_id: int, rows: int = 8, length: int = 256) -> torch.Tensor:
    """Random token ids for the calibration's hidden states, without the stop token."""
    ids = torch.tensor(prompt_ids(rows, length, vocab, seed=1))
    return torch.where(ids == stop_id, ids + 1, ids)


# ---- r1lab ------------------------------------------------------------------------------------
def copy_bandwidth_gbs() -> float:
    """Device-to-device copy rate, bytes read + written: the memory ceiling of this card."""
    src = torch.empty(2**29, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    sync()
    seconds = start.elapsed_time(end) / 1000 / 10
    return 2 * src.numel() * 4 / seconds / 1e9


def decode_roofline_ms(cfg, rows: int, width: int, new: int, bandwidth_gbs: float) -> dict:
    """Fewest bytes one decode step must move (bf16), over the measured copy rate.

    Per step: every weight once (the tied embedding as the LM head), the KV cache up to
    the current position (averaged over the N steps), and the logits written and read once.
    """
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd, h, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = d * (h + 2 * kv) * hd + (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d
    weights = 2 * (layers * per_layer + cfg.vocab_size * d + d)
    mean_ctx = width + (new + 1) / 2
    kv_bytes = 2 * layers * 2 * rows * kv * hd * mean_ctx
    logits = 2 * 2 * rows * cfg.vocab_size
    total = weights + kv_bytes + logits
    return {
        "weights_gb": round(weights / 1e9, 3),
        "kv_gb": round(kv_bytes / 1e9, 3),
        "logits_gb": round(logits / 1e9, 3),
        "bandwidth_gbs": round(bandwidth_gbs),
        "roofline_ms": round(total / (bandwidth_gbs * 1e9) * 1e3, 3),
    }


def model_config(shape: dict, layers: int | None = None):
    """r1lab's config of a Qwen2.5-shaped decoder from SHAPES; no stop token, so every
    completion is full length. `layers` overrides the depth (a one-layer kernel test)."""
    from r1lab.model.config import ModelConfig

    return ModelConfig(
        model_type="qwen2",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=layers or shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=shape.get("tied", True),
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=PAD,
    )


def run_r1lab(args, shape: dict, work: dict) -> dict:
    from r1lab.engine import decode_ops, fallbacks, fast_generate
    from r1lab.engine.generate import SamplingParams
    from r1lab.model.transformer import Transformer
    from r1lab.training import make_optimizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.kernel_config:  # launch shapes picked by benchmarks/decode_kernels.py
        for name, value in json.loads(Path(args.kernel_config).read_text())["best"].items():
            if not hasattr(decode_ops, name):
                raise SystemExit(f"--kernel-config: decode_ops has no launch shape {name!r}")
            setattr(decode_ops, name, value)
    torch.manual_seed(0)
    cfg = model_config(shape)
    stop = None
    if "stop_fraction" in work:  # completions end at EOS, calibrated to the mean length
        cfg = dataclasses.replace(cfg, eos_token_id=EOS)
    model = Transformer(cfg).to(dev)  # fp32 master weights
    if "stop_fraction" in work:
        ids = calibration_ids(cfg.vocab_size, EOS).to(dev)
        p_stop = stop_probability(work["new_tokens"], work["stop_fraction"])
        stop = calibrate_stop(model.hidden_states(ids).flatten(0, 1), model.lm_head.weight.data,
                              EOS, p_stop)  # fmt: skip
    ref = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    optimizer = make_optimizer(model, lr=3e-6, weight_decay=0.0, betas=(0.9, 0.999))
    p, g, n = work["prompts"], work["group"], work["new_tokens"]
    prompts_all = prompt_ids(p * (args.steps + args.warmup), work["prompt_len"], cfg.vocab_size)
    params = SamplingParams(temperature=1.0, max_new_tokens=n, n=g)
    result = {
        "tool": "r1lab",
        "params": model.num_parameters(),
        "completions_per_step": p * g,
        "completion_len": n,
        "prompt_len": work["prompt_len"],
        "stop_calibration": stop,
        "checkpoint_layers": checkpoint_setting(args),  # as this process ran it
        "steps": [],
    }
    if dev.type == "cuda":
        result["decode_roofline"] = decode_roofline_ms(
            cfg, p * g, work["prompt_len"], n, copy_bandwidth_gbs()
        )
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        prompts = prompts_all[step * p : (step + 1) * p]
        # the engine's weights copy and KV cache are not needed to train
        record, batch = timed_step(
            args, model, model, optimizer, ref, prompts, params, step, release=not args.keep_engine
        )
        if dev.type == "cuda":
            record["sampler"] = {
                k: round(v, 3) if isinstance(v, float) else v
                for k, v in fast_generate.last_stats().items()
            }
        result["steps"].append(record)
        # every fast path that declined so far (a slow run is never silent), and how often
        # torch.compile recompiled or gave up on a frame
        result["declines"] = {f"{p}: {r}": n for (p, r), n in fallbacks.declines().items()}
        result["dynamo"] = dynamo_counters()
        emit(tool="r1lab", **record)
        summarise(result, args.warmup)
        write_json(args.out, result)
        if args.profile and step == args.warmup:
            result["profile"] = profile_step(
                args, model, optimizer, ref, prompts, params, batch, step
            )
            write_json(args.out, result)
    return result


def timed_step(
    args, policy, sampler, optimizer, ref, prompts, params, step, *, release=True, refresh=None
) -> tuple[dict, object]:
    """One GRPO step as the benchmark times it: the rollout (after `refresh`, which readies
    the sampler's weights), then the stage's own update on it. Rewards are a cheap function
    of the tokens: the work, not the reward, is what is timed."""
    from r1lab.engine import fast_generate
    from r1lab.engine.generate import sample
    from r1lab.engine.grpo_update import TrainBatch
    from r1lab.rl.advantages import group_advantages

    sync()
    t0 = time.perf_counter()
    if refresh is not None:
        refresh()
    completions = sample(sampler, prompts, params)
    if release:
        fast_generate.release(sampler)
    sync()
    t1 = time.perf_counter()
    comp_ids = [c.token_ids for c in completions]
    rewards = [float(sum(ids) % 7) for ids in comp_ids]
    batch = TrainBatch(
        prompt_ids=[prompts[c.prompt_index] for c in completions],
        completion_ids=comp_ids,
        advantages=group_advantages(rewards, params.n),
        counted=[True] * len(comp_ids),
        sampler_logprobs=[c.logprobs for c in completions],
    )
    stats = update(args, policy, optimizer, ref, batch, step)
    sync()
    t2 = time.perf_counter()
    record = {
        "step": step,
        "step_s": round(t2 - t0, 3),
        "rollout_s": round(t1 - t0, 3),
        "train_s": round(t2 - t1, 3),
        "loss": round(float(stats.get("loss", float("nan"))), 6),
        "kl": round(float(stats.get("kl", 0.0)), 8),
        "grad_norm": round(float(stats.get("grad_norm", float("nan"))), 4),
        "checkpointed_layers": stats.get("checkpointed_layers"),
        "logprob_diff": float(stats.get("logprob_diff", float("nan"))),
        "mean_completion_len": sum(map(len, comp_ids)) / len(comp_ids),
        "peak_gb": peak_gb(),
    }
    return record, batch


def dynamo_counters() -> dict:
    """torch.compile's own counts: frames compiled, recompiles, and graph breaks."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {
        "frames": dict(counters["frames"]),
        "recompiles": dict(counters["recompiles"]),
        "graph_breaks": len(counters["graph_break"]),
    }


def checkpoint_setting(args) -> bool | str:
    """`checkpoint_layers` as the options ask: none, as memory allows, or every layer."""
    return False if args.no_checkpoint else ("auto" if args.checkpoint_auto else True)


def update(args, model, optimizer, ref, batch, step: int) -> dict:
    """The update of `r1lab grpo` itself (reference pass, policy forward and backward,
    clipping, optimizer step), with the stage's defaults and the options asked for."""
    from r1lab.engine.grpo_update import UpdateSettings, update_on_rollout

    settings = UpdateSettings(
        temperature=1.0,
        beta=args.beta,
        micro_batch_size=args.micro_batch_size,
        grad_clip=1.0,
        packed=True,
        compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        lm_head_chunk=args.chunk_size,
        checkpoint_layers=checkpoint_setting(args),
        compile_layers=False if args.no_compile else None,
    )
    return update_on_rollout(model, optimizer, batch, settings, step=step, ref_model=ref)


def profile_step(args, model, optimizer, ref, prompts, params, batch, step: int):
    """Where the time of one step goes, to a text file and the JSON's "profile": the device
    time of each labelled range of the update (`grpo/reference`, `grpo/policy_forward`,
    `grpo/backward`, `grpo/optimizer`) and the GPU kernels that take the most of each phase.

    The profiled update is a real one (an optimizer step more than the timed steps)."""
    from torch.profiler import ProfilerActivity, profile

    from r1lab.engine import fast_generate
    from r1lab.engine.generate import sample

    phases = {
        "rollout": lambda: sample(model, prompts, params),
        "update": lambda: update(args, model, optimizer, ref, batch, step),
    }
    lines, summary = [], {}
    for name, fn in phases.items():
        sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        wall = time.perf_counter() - t0
        ranges, kernels = device_times(prof)
        total = sum(kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
        summary[name] = {
            "wall_s": round(wall, 3),
            "kernel_s": round(total / 1e6, 3),
            "ranges_s": {k: round(v / 1e6, 3) for k, v in sorted(ranges.items())},
            "top_kernels_ms": {k[:90]: round(v / 1e3, 2) for k, v in top},
        }
        lines.append(f"==== {name}: wall {wall:.3f} s, kernels {total / 1e6:.3f} s")
        lines += [f"  range {k}: {v / 1e6:.3f} s" for k, v in sorted(ranges.items())]
        lines += [f"  {v / 1e3:9.2f} ms {100 * v / total:5.1f}%  {k[:110]}" for k, v in top]
        if name == "rollout" and not args.keep_engine:
            fast_generate.release(model)
    model.zero_grad(set_to_none=True)
    Path(args.out).with_suffix(".profile.txt").write_text("\n".join(lines))
    print("\n".join(lines), file=sys.stderr)
    return summary


def device_times(prof) -> tuple[dict[str, float], dict[str, float]]:
    """Microseconds of device time: per labelled `grpo/` range (the kernels launched inside
    it, as the profiler attributes them to the host range), and per kernel name."""
    ranges: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            if not evt.name.startswith("grpo/"):  # the range's own device copy is not a kernel
                us = evt.time_range.elapsed_us()
                kernels[evt.name] = kernels.get(evt.name, 0.0) + us
        elif evt.name.startswith("grpo/"):
            us = getattr(evt, "device_time_total", None)
            if us is None:
                us = getattr(evt, "cuda_time_total", 0.0)
            ranges[evt.name] = ranges.get(evt.name, 0.0) + us
    return ranges, kernels


def mean_completion_len(result: dict, warmup: int) -> float:
    """Mean completion length over the steady steps, as each tool logs it (r1lab:
    `mean_completion_len`, TRL: `completions/mean_length`); the maximum if neither."""
    steps = result["steps"][warmup:] or result["steps"]
    lengths = [s.get("mean_completion_len", s.get("completions/mean_length")) for s in steps]
    lengths = [x for x in lengths if x is not None]
    return sum(lengths) / len(lengths) if lengths else float(result["completion_len"])


# bf16 matrix-multiply rate measured on the H200 (issue 14): the MFU denominator
PEAK_FLOPS = 790e12


def training_flops(
    model: dict, prompt_len: int, completion_len: float, sequences: int, reference: bool = True
) -> float:
    """Model FLOPs of one update on this workload, counted (not measured): the reference
    forward (when there is a KL term, `reference`) plus the policy's forward and backward
    (2x the forward), i.e. four forwards or three, whatever either tool recomputes
    (recomputation is hardware work, not model work).

    A forward: 2 FLOPs per weight of each layer's projections per token (q, k, v, o, gate,
    up, down; the biases' adds left out); attention 4 x heads x head_dim per token per key
    (scores and the weighted sum), each token seeing the (L + 1) / 2 keys of a causal
    sequence of length L on average, at the mean length; the LM head 2 x hidden x vocab on
    the completion tokens only (the prompt's logits are never needed)."""
    hidden, ffn, layers = model["hidden"], model["ffn"], model["layers"]
    head_dim = model.get("head_dim", hidden // model["heads"])
    q, kv = model["heads"] * head_dim, model["kv"] * head_dim
    weights = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * ffn
    length = prompt_len + completion_len
    tokens = sequences * length
    forward = 2 * weights * layers * tokens
    forward += 4 * q * (length + 1) / 2 * layers * tokens
    forward += 2 * hidden * model["vocab"] * sequences * completion_len
    return (4 if reference else 3) * forward


def train_mfu(data: dict) -> dict:
    """Each tool's training MFU in a combined run: model FLOPs (`training_flops`, at the
    tool's own mean completion length) over its training seconds and PEAK_FLOPS."""
    out = {}
    w = data["workload"]
    for tool, result in data["results"].items():
        train_s = (result or {}).get("steady", {}).get("train_s")
        if not train_s:
            continue
        n = mean_completion_len(result, data.get("settings", {}).get("warmup", 1))
        sequences, with_ref = w["prompts"] * w["group"], w.get("beta", 0.0) > 0
        flops = training_flops(data["model"], w["prompt_len"], n, sequences, with_ref)
        out[tool] = round(flops / train_s / PEAK_FLOPS, 3)
    return out


def summarise(result: dict, warmup: int) -> None:
    """Steady-state figures (mean over the steps after `warmup`) added to `result`."""
    steps = result["steps"]
    if not steps:
        return
    total = steady([s["step_s"] for s in steps], warmup)
    rollout = steady([s["rollout_s"] for s in steps], warmup)
    comps, n = result["completions_per_step"], mean_completion_len(result, warmup)
    tokens = comps * (n + result["prompt_len"])
    result["steady"] = {
        "step_s": round(total, 3),
        "rollout_s": round(rollout, 3),
        "train_s": round(total - rollout, 3),
        "completions_per_s": round(comps / total, 2),
        "rollout_tok_per_s": round(comps * n / rollout),
        "train_tok_per_s": round(tokens / max(total - rollout, 1e-9)),
        "completion_tok_per_s": round(comps * n / total),
        "peak_gb": steps[-1].get("peak_gb"),
        "mean_completion_len": round(n, 1),
    }
    decode = [s["sampler"]["ms_per_step"] for s in steps[warmup:] if "sampler" in s]
    if decode:
        result["steady"]["decode_ms_per_step"] = round(sum(decode) / len(decode), 3)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1))


# ---- TRL ---------------------------------------------------------------------------------------
def run_trl(args, shape: dict, work: dict) -> dict:
    import datasets.fingerprint
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

    # Dataset fingerprinting (only names cache files) fails on the GPU image's pyarrow; a
    # random fingerprint sidesteps it without touching what is timed.
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: os.urandom(8).hex())
    import trl
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    vocab = shape["vocab"]
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=1e6,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    # A word-level tokenizer over the whole vocabulary: "t123" is token 123, so a prompt
    # of L words is exactly L tokens and no hub download is needed.
    words = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD, "[UNK]": 3}
    words.update({f"t{i}": i for i in range(FIRST_ID, vocab)})
    core = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="[UNK]",
    )
    tok.padding_side = "left"
    folder = Path(args.workdir) / f"trl_model_{args.shape}"
    torch.manual_seed(0)
    hf_model, stop = Qwen2ForCausalLM(cfg), None
    if "stop_fraction" in work:  # the same calibration as r1lab's, on this model's weights
        with torch.no_grad():
            hidden = hf_model.model(calibration_ids(vocab, EOS)).last_hidden_state
        p_stop = stop_probability(work["new_tokens"], work["stop_fraction"])
        stop = calibrate_stop(hidden.flatten(0, 1), hf_model.lm_head.weight.data, EOS, p_stop)
    hf_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    p, g, n = work["prompts"], work["group"], work["new_tokens"]
    total_steps = args.warmup + args.steps
    texts = [
        " ".join(f"t{i}" for i in ids)
        for ids in prompt_ids(p * total_steps, work["prompt_len"], vocab)
    ]
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl_out"),
        per_device_train_batch_size=p,
        gradient_accumulation_steps=g,  # one generation batch of p * g per optimizer step
        num_generations=g,
        max_completion_length=n,
        # full-length completions, as r1lab's (none on the variable-length workload)
        generation_kwargs={} if "stop_fraction" in work else {"min_new_tokens": n},
        beta=args.beta,
        learning_rate=3e-6,
        temperature=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        max_steps=total_steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        model_init_kwargs={"dtype": torch.float32},
    )
    result = {
        "tool": "trl",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "completions_per_step": p * g,
        "completion_len": n,
        "prompt_len": work["prompt_len"],
        "stop_calibration": stop,
        "gradient_checkpointing": config.gradient_checkpointing,
        "steps": [],
    }
    gen_times: list[float] = []
    original_generate = Qwen2ForCausalLM.generate

    def timed_generate(self, *a, **kw):
        sync()
        t = time.perf_counter()
        out = original_generate(self, *a, **kw)
        sync()
        gen_times.append(time.perf_counter() - t)
        return out

    Qwen2ForCausalLM.generate = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            sync()
            self.t = time.perf_counter()
            self.gen_before = len(gen_times)

        def on_step_end(self, *a, **kw):
            sync()
            record = {
                "step": len(result["steps"]),
                "step_s": round(time.perf_counter() - self.t, 3),
                "rollout_s": round(sum(gen_times[self.gen_before :]), 3),
                "peak_gb": peak_gb(),
            }
            result["steps"].append(record)

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and result["steps"]:
                rec = result["steps"][-1]
                for key in ("completions/mean_length", "kl", "loss"):
                    if key in logs:
                        rec[key] = logs[key]
                emit(tool="trl", **rec)
                summarise(result, args.warmup)
                write_json(args.out, result)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = GRPOTrainer(
        model=str(folder),
        reward_funcs=lambda completions, **kw: [float(len(c) % 7) for c in completions],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": texts}),
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    trainer.train()
    summarise(result, args.warmup)
    write_json(args.out, result)
    return result


# ---- orchestration and reporting ---------------------------------------------------------------
def environment() -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        env["trl"] = version("trl")
    except Exception:  # noqa: BLE001 - not installed
        env["trl"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,memory.total,driver_version",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


# the on/off options a worker acts on, passed on to its subprocess (one left out here would
# be silently ignored there: the settings recorded would not be the ones run)
WORKER_FLAGS = ("no_checkpoint", "checkpoint_auto", "no_compile", "keep_engine", "profile")


def run_worker_subprocess(tool: str, args, out: Path) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        "--shape",
        args.shape,
        "--workload",
        args.workload,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--beta",
        str(args.beta),
        "--out",
        str(out),
        "--workdir",
        args.workdir,
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--chunk-size",
        str(args.chunk_size),
    ]
    if args.kernel_config:
        cmd += ["--kernel-config", args.kernel_config]
    for flag in WORKER_FLAGS:
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.tool_timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    data = json.loads(out.read_text()) if out.exists() else None
    if data is not None:
        data["exit"] = status
    else:
        emit(tool=tool, error=f"no result (exit {status})")
    return data


def compare(results: dict) -> dict:
    r, t = results.get("r1lab"), results.get("trl")
    if not (r and t and r.get("steady") and t.get("steady")):
        return {}
    rs, ts = r["steady"], t["steady"]
    out = {
        "step_speedup": round(ts["step_s"] / rs["step_s"], 2),
        "rollout_speedup": round(ts["rollout_s"] / rs["rollout_s"], 2),
        "train_speedup": round(ts["train_s"] / rs["train_s"], 2),
        "peak_mem_ratio": round(rs["peak_gb"] / ts["peak_gb"], 3) if ts.get("peak_gb") else None,
    }
    roof = r.get("decode_roofline", {}).get("roofline_ms")
    if roof and rs.get("decode_ms_per_step"):
        out["decode_over_roofline"] = round(rs["decode_ms_per_step"] / roof, 2)
    return out


def print_table(combined: dict) -> None:
    rows = [
        ("step (s)", "step_s"),
        ("rollout (s)", "rollout_s"),
        ("train: ref + policy (s)", "train_s"),
        ("completions/s", "completions_per_s"),
        ("rollout tokens/s", "rollout_tok_per_s"),
        ("training tokens/s", "train_tok_per_s"),
        ("peak memory (GiB)", "peak_gb"),
    ]
    res = combined["results"]
    print(f"\n{'':26}{'r1lab':>12}{'TRL':>12}")
    for label, key in rows:
        vals = [res.get(t, {}).get("steady", {}).get(key, "-") for t in ("r1lab", "trl")]
        print(f"{label:26}{vals[0]!s:>12}{vals[1]!s:>12}")
    r = res.get("r1lab", {})
    if r.get("steady", {}).get("decode_ms_per_step"):
        print(
            f"r1lab decode: {r['steady']['decode_ms_per_step']} ms/step, roofline "
            f"{r['decode_roofline']['roofline_ms']} ms ({r['decode_roofline']})"
        )
    print("ratios:", json.dumps(combined.get("comparison", {})), flush=True)


def orchestrate(args) -> None:
    out = Path(args.out)
    combined = {
        "date": datetime.date.today().isoformat(),
        "shape": args.shape,
        "workload": {**WORKLOADS[args.workload], "beta": args.beta},
        "model": SHAPES[args.shape],
        "environment": environment(),
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "micro_batch_size": args.micro_batch_size,
            "chunk_size": args.chunk_size,
            "checkpoint": "none"
            if args.no_checkpoint
            else ("auto" if args.checkpoint_auto else "all"),
            "compiled_layers": not args.no_compile,
            "sampler_memory_kept": args.keep_engine,
            "kernel_config": json.loads(Path(args.kernel_config).read_text())["best"]
            if args.kernel_config
            else None,
        },
        "results": {},
    }
    for tool in args.tools.split(","):
        emit(event="start", tool=tool, shape=args.shape)
        data = run_worker_subprocess(tool, args, out.with_suffix(f".{tool}.json"))
        if data is not None:
            combined["results"][tool] = data
        combined["comparison"] = compare(combined["results"])
        combined["train_mfu"] = train_mfu(combined)
        write_json(str(out), combined)
    print_table(combined)


def append_results(path: str) -> None:
    """Format a combined JSON run as a RESULTS.md section and append it."""
    data = json.loads(Path(path).read_text())
    for result in data["results"].values():  # derived figures, from the steps as logged
        if result and result.get("steps"):
            summarise(result, data.get("settings", {}).get("warmup", 1))
    data["comparison"] = compare(data["results"])
    env, res, cmp_ = data["environment"], data["results"], data["comparison"]
    w, shape = data["workload"], data["model"]
    lines = [
        f"\n## {data['date']}: GRPO step, {data['shape']} shape",
        "",
        f"- hardware: {env.get('nvidia_smi') or env.get('gpu', 'cpu')}",
        f"- versions: torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"trl {env.get('trl')}, python {env.get('python')}",
        f"- model: random weights, vocab {shape['vocab']}, {shape['layers']} layers, hidden "
        f"{shape['hidden']}, ffn {shape['ffn']}, heads {shape['heads']}/{shape['kv']} (GQA)",
        f"- workload: {w['prompts']} prompts x {w['prompt_len']} tokens, G={w['group']}, "
        f"{w['prompts'] * w['group']} completions x {w['new_tokens']} new tokens "
        + (
            f"(stop token calibrated to a mean of {w['stop_fraction']:.0%} of the maximum)"
            if "stop_fraction" in w
            else "(forced full length)"
        )
        + f", beta {w['beta']}, one optimizer step per rollout",
        f"- settings: {json.dumps(data.get('settings', {}))}",
        "",
        "| per step (steady state) | r1lab | TRL GRPOTrainer |",
        "| --- | --- | --- |",
    ]
    for label, key in [
        ("step time (s)", "step_s"),
        ("rollout (s)", "rollout_s"),
        ("training: ref + policy + optimizer (s)", "train_s"),
        ("completions/s", "completions_per_s"),
        ("rollout tokens/s", "rollout_tok_per_s"),
        ("training tokens/s (prompt + completion)", "train_tok_per_s"),
        ("peak memory allocated (GiB)", "peak_gb"),
        ("mean completion length (tokens)", "mean_completion_len"),
    ]:
        vals = [(res.get(t) or {}).get("steady", {}).get(key, "not run") for t in ("r1lab", "trl")]
        lines.append(f"| {label} | {vals[0]} | {vals[1]} |")
    mfu = train_mfu(data)
    vals = [mfu.get(t, "not run") for t in ("r1lab", "trl")]
    peak = f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s"
    lines.append(f"| training MFU (model FLOPs / {peak}) | {vals[0]} | {vals[1]} |")
    for tool in ("r1lab", "trl"):
        steps = (res.get(tool) or {}).get("steps", [])
        if steps:
            times = ", ".join(str(s["step_s"]) for s in steps)
            lines.append(f"\n{tool} step times (s, first = warm-up): {times}")
    r = res.get("r1lab") or {}
    if r.get("decode_roofline"):
        roof = r["decode_roofline"]
        lines.append(
            f"\nr1lab decode: {r['steady'].get('decode_ms_per_step')} ms per step at batch "
            f"{r['completions_per_step']}; roofline {roof['roofline_ms']} ms (weights "
            f"{roof['weights_gb']} GB + mean KV {roof['kv_gb']} GB + logits {roof['logits_gb']} GB "
            f"at the measured copy rate {roof['bandwidth_gbs']} GB/s)."
        )
    if cmp_:
        lines.append(f"\nRatios (TRL / r1lab time; r1lab / TRL memory): {json.dumps(cmp_)}")
    with RESULTS_MD.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default=None)
    ap.add_argument("--tools", default="r1lab,trl")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.001)
    ap.add_argument(
        "--micro-batch-size",
        type=int,
        default=32,
        help="r1lab's sequences per forward, as grpo's micro_batch_size (0 = the whole "
        "batch); 32 = TRL's here (per_device_train_batch_size is the prompts per step)",
    )
    ap.add_argument("--chunk-size", type=int, default=1024, help="LM-head rows per chunk")
    ap.add_argument("--no-checkpoint", action="store_true", help="recompute no layer")
    ap.add_argument(
        "--checkpoint-auto", action="store_true", help="recompute only the layers memory needs"
    )
    ap.add_argument("--no-compile", action="store_true", help="eager decoder layers in training")
    ap.add_argument("--keep-engine", action="store_true", help="keep the sampler's memory")
    ap.add_argument("--profile", action="store_true", help="profile one step after the warm-up")
    ap.add_argument(
        "--kernel-config", metavar="JSON", help="decode kernel shapes from decode_kernels.py"
    )
    ap.add_argument("--out", default="grpo_step.json")
    ap.add_argument("--workdir", default="/tmp/grpo_bench")
    ap.add_argument("--tool-timeout", type=float, default=None, help="seconds per tool")
    ap.add_argument("--worker", choices=["r1lab", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--append-results", metavar="JSON")
    args = ap.parse_args(argv)
    if args.append_results:
        append_results(args.append_results)
        return
    args.workload = args.workload or ("tiny" if args.shape == "tiny" else "full")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        runner = run_r1lab if args.worker == "r1lab" else run_trl
        runner(args, SHAPES[args.shape], WORKLOADS[args.workload])
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
