"""`r1lab grpo` on one GPU and under torchrun on several: completions per second, step split,
per-GPU peak memory, from the stage's own metrics.jsonl.

Builds a seeded random decoder of `--shape` (Qwen2.5-1.5B or -7B dimensions, or a small
CPU-sized one) with the tests' BPE tokenizer (300 tokens; the model's larger vocabulary
is sampled too and decodes to nothing, so a random model rarely stops before
`--max-new-tokens`), then runs the grpo stage once per `--runs` entry `NPROC:QUESTIONS`
(`r1lab grpo --nproc NPROC`, QUESTIONS x `--group-size` completions a step), one after the
other. A run is stopped once `--steps` steps are logged: what is timed is the steps, not
the final checkpoint (at 7B the FSDP state is ~90 GB on disk). The steady figures are the
means over the steps after the first (compilation, autotuning, CUDA graphs).

    # issue 15's comparison: 256 completions on one GPU, 512 on two
    python benchmarks/distributed_grpo.py --shape 1.5b --runs 1:32 2:64 --out d15.json
    python benchmarks/distributed_grpo.py --shape 7b --runs 2:32 --steps 3 --out d7.json
    python benchmarks/distributed_grpo.py --shape tiny --device cpu --runs 1:4 2:8 --steps 2

`--prompt-tokens N` replaces the stage's task by prompts of exactly N tokens in the plain
template (a jsonl task), so a run can do grpo_step.py's work (`--prompt-tokens 128`) and its
step time be compared with that benchmark's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def base_model(folder: Path, shape: dict, device: str) -> Path:
    """A seeded random decoder of `shape` (grpo_step.py's Qwen2.5 shapes), saved in bf16
    (fp32 on the CPU) with the tests' tokenizer; built on `device` (a 7B model is
    initialised in seconds on a GPU)."""
    import torch
    from grpo_step import model_config
    from test_recipe_pins import worked_examples

    from r1lab.model.checkpoint import save_model
    from r1lab.model.tokenizer import train_tokenizer
    from r1lab.model.transformer import Transformer

    if (folder / "config.json").exists():
        return folder
    texts = [r["prompt"] + r["response"] for r in worked_examples(200, seed=1)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    cfg = dataclasses.replace(
        model_config(shape),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    save_model(model, folder, tokenizer=tokenizer)
    del model
    if device == "cuda":  # the runs below need this GPU's memory (30 GB at 7B)
        torch.cuda.empty_cache()
    return folder


def fixed_length_questions(tokenizer, template: str, tokens: int, count: int, seed: int = 0):
    """`count` distinct questions whose prompts, rendered with `template` and tokenized as
    `grpo` does (`judging.sample_questions`), are `tokens` long (or one more where the
    tokenizer merges otherwise): random digits, one at a time, until the length is
    reached. grpo_step.py's prompts are 128 tokens; the stage's own task, rendered in the
    R1 template by the benchmark's 300-token tokenizer, gives about 340 (the template's
    text alone is over 300), hence the plain template here."""
    import random

    from r1lab.model.tokenizer import render_prompt

    def length(question: str) -> int:
        return len(tokenizer(render_prompt(template, question, tokenizer))["input_ids"])

    start = "Add up:"
    if length(start) >= tokens:
        raise SystemExit(f"--prompt-tokens {tokens}: the {template!r} template alone is longer")
    rng = random.Random(seed)
    questions: set[str] = set()
    for _ in range(20 * count):  # a few digits' room holds few distinct questions
        question = start
        while length(question) < tokens:
            question += f" {rng.randint(0, 9)}"
        if length(question) > tokens:  # a digit and its space are two tokens: drop a space
            shorter = question[:-2] + question[-1]
            question = shorter if length(shorter) == tokens else question
        questions.add(question)
        if len(questions) == count:
            return sorted(questions)
    raise SystemExit(
        f"--prompt-tokens {tokens}: only {len(questions)} distinct questions of that length "
        f"in the {template!r} template (asked {count}); ask for longer prompts"
    )


PLAIN = "plain"  # the template of fixed-length prompts: the question alone


def write_questions(work: Path, tokens: int, count: int = 512) -> tuple[Path, float]:
    """A jsonl task of `fixed_length_questions` in the plain template, and the mean prompt
    length it gives."""
    from r1lab.model.tokenizer import load_tokenizer, render_prompt

    tokenizer = load_tokenizer(work / "base")
    questions = fixed_length_questions(tokenizer, PLAIN, tokens, count)
    path = work / f"questions{tokens}.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in questions))
    rendered = [render_prompt(PLAIN, q, tokenizer) for q in questions]
    mean = sum(len(ids) for ids in tokenizer(rendered)["input_ids"]) / len(questions)
    return path, mean


def logged_steps(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step_time" in r]


def mean_after_first(values: list[float]) -> float | None:
    rest = values[1:]
    return round(sum(rest) / len(rest), 3) if rest else None


def run_stage(args, work: Path, nproc: int, questions: int) -> dict:
    """One `r1lab grpo` run, stopped (its whole process group) once `args.steps` are logged."""
    import yaml

    out = work / f"run{nproc}x{questions}"
    grpo = dict(
        model=str(work / "base"),
        steps=args.steps + 100,  # never reached: the run is stopped after args.steps
        questions_per_step=questions,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        micro_batch_size=args.micro_batch_size,
        eval_n=2,
        eval_k=1,
        eval_every=0,
        eval_max_new_tokens=8,
        warmup_steps=0,
        lr=1e-6,
        beta=args.beta,
        save_every=10_000,
        log_samples=0,
        rewards={"pinrewards:spread": 1},
        **(
            {"tasks": [{"name": "jsonl", "path": str(args.questions)}], "template": PLAIN}
            if args.questions
            else {}
        ),
        device=args.device,
        dtype="auto",
    )
    preset = work / f"p{nproc}x{questions}.yaml"
    preset.write_text(yaml.safe_dump({"grpo": grpo}))
    env = {**os.environ, "R1LAB_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(work), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "r1lab.cli", "grpo"] + (["--nproc", str(nproc)] * (nproc > 1))
    cmd += ["--preset", str(preset), "--out", str(out), "--no-resume"]
    log = (work / f"log{nproc}x{questions}.txt").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    status = "timeout"
    while time.perf_counter() - start < args.timeout:
        if len(logged_steps(out / "metrics.jsonl")) >= args.steps:
            status = "ok"
            break
        if proc.poll() is not None:
            status = f"exit {proc.returncode}"
            break
        time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    steps = logged_steps(out / "metrics.jsonl")[: args.steps]
    step_s = [r["step_time"] for r in steps]
    completions = questions * args.group_size
    steady = mean_after_first(step_s)
    row = {
        "nproc": nproc,
        "status": status,
        "completions_per_step": completions,
        "step_s": [round(t, 3) for t in step_s],
        "rollout_s": [round(r.get("rollout_time", float("nan")), 3) for r in steps],
        "train_s": [round(r.get("train_time", float("nan")), 3) for r in steps],
        "peak_memory_gb": [round(r["peak_memory_gb"], 2) for r in steps if "peak_memory_gb" in r],
        "mean_completion_len": [r.get("completions/mean_length") for r in steps],
        "loss": [r.get("loss") for r in steps],
        "steady_step_s": steady,
        "steady_rollout_s": mean_after_first([r.get("rollout_time", 0.0) for r in steps]),
        "steady_train_s": mean_after_first([r.get("train_time", 0.0) for r in steps]),
        "completions_per_s": round(completions / steady, 2) if steady else None,
    }
    if status != "ok":
        row["log_tail"] = (work / f"log{nproc}x{questions}.txt").read_text()[-3000:]
    return row


def main() -> int:
    from grpo_step import SHAPES
    from test_recipe_pins import REWARDS_MODULE

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b", help="grpo_step.SHAPES")
    ap.add_argument(
        "--runs", nargs="+", default=["1:32", "2:64"], help="NPROC:QUESTIONS, one run each"
    )
    ap.add_argument("--steps", type=int, default=4, help="logged steps per run (first = warm-up)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=32, help="as grpo_step.py's")
    ap.add_argument("--beta", type=float, default=0.001)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/distributed_grpo")
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per run")
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="prompts of this many tokens (grpo_step.py's: 128) instead of the task's own",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    work = Path(args.work) / args.shape
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_model(work / "base", SHAPES[args.shape], args.device)
    print(json.dumps({"built_base_s": round(time.perf_counter() - t0, 1)}), flush=True)
    (work / "pinrewards.py").write_text(REWARDS_MODULE)
    args.questions, prompt_tokens = None, None
    if args.prompt_tokens:
        args.questions, prompt_tokens = write_questions(work, args.prompt_tokens)
        print(json.dumps({"mean_prompt_tokens": round(prompt_tokens, 2)}), flush=True)
    results = []
    for spec in args.runs:
        nproc, questions = (int(x) for x in spec.split(":"))
        row = run_stage(args, work, nproc, questions)
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            questions = str(args.questions) if args.questions else None
            report = {"args": {**vars(args), "questions": questions}}
            report.update(shape=SHAPES[args.shape], mean_prompt_tokens=prompt_tokens, runs=results)
            Path(args.out).write_text(json.dumps(report, indent=2))
    rates = [r["completions_per_s"] for r in results]
    if len(results) >= 2 and all(rates):
        print(json.dumps({"completions_per_s_ratio": round(rates[-1] / rates[0], 3)}))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
