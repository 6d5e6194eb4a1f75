"""`r1lab grpo --nproc N` on a random Qwen2-shaped checkpoint: step times from metrics.jsonl.

Builds a seeded decoder of `--size` (r1lab.model.config sizes; its tokenizer is the tests'
BPE over fixed worked sums) and a preset, then runs the grpo stage under torchrun for each
`--nproc` given, one after the other, and prints (and writes to `--out`) every step's
`step_time` and the mean over the steps after the first.

    python benchmarks/distributed_grpo.py --nproc 2 1 --out dist.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def base_model(folder: Path, size: str) -> Path:
    """A seeded random model of `size` with the recipe pins' tokenizer (the tests' builder)."""
    from test_recipe_pins import micro_model_dir

    return micro_model_dir(folder, size)


def main() -> int:
    import yaml
    from test_recipe_pins import REWARDS_MODULE

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--nproc", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--questions", type=int, default=16, help="questions per step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/distributed_grpo")
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds per run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_model(work / "base", args.size)
    (work / "pinrewards.py").write_text(REWARDS_MODULE)
    grpo = dict(
        model=str(work / "base"),
        steps=args.steps,
        questions_per_step=args.questions,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        eval_n=2,
        eval_k=1,
        eval_every=0,
        warmup_steps=0,
        lr=1e-5,
        beta=0.04,
        save_every=args.steps,
        log_samples=0,
        rewards={"pinrewards:spread": 1},
        device=args.device,
        dtype="auto",
    )
    (work / "p.yaml").write_text(yaml.safe_dump({"grpo": grpo}))
    env = {**os.environ, "R1LAB_NO_PROGRESS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(work), str(ROOT), env.get("PYTHONPATH", "")])
    results = []
    for n in args.nproc:
        out = work / f"run{n}"
        cmd = [sys.executable, "-m", "r1lab.cli", "grpo"] + (["--nproc", str(n)] if n > 1 else [])
        cmd += ["--preset", str(work / "p.yaml"), "--out", str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=args.timeout
            )
            rc, tail = done.returncode, (done.stdout + done.stderr)[-2500:]
        except subprocess.TimeoutExpired as err:
            rc, tail = "timeout", str(err)[-500:]
        wall = time.perf_counter() - start
        logged = []
        if (out / "metrics.jsonl").exists():
            lines = (out / "metrics.jsonl").read_text().splitlines()
            logged = [r for r in map(json.loads, lines) if "step_time" in r]
        times = [r["step_time"] for r in logged]
        row = {
            "nproc": n,
            "rc": rc,
            "wall_s": round(wall, 1),
            "step_times": [round(t, 3) for t in times],
            "steady_step_s": round(sum(times[1:]) / len(times[1:]), 3) if len(times) > 1 else None,
            "loss": [r.get("loss") for r in logged],
            "completions_per_step": args.questions * args.group_size,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        if rc != 0:
            print(tail, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
