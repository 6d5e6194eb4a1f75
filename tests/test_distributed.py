"""Two gloo ranks on the CPU give the one-process results (issue 15).

Each test spawns two processes (`torch.multiprocessing`, the environment torchrun would
set), runs the same work sharded with FSDP2, and compares with one process in fp32.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_grpo_microbatch import VOCAB, rollout_batch
from test_grpo_microbatch import micro_model as microbatch_model

from r1lab import distributed
from r1lab.engine.grpo_update import UpdateSettings, update_on_rollout
from r1lab.model.transformer import Transformer
from r1lab.training import make_optimizer

WORLD = 2
TOL = 1e-5


# ---- harness ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn, world: int, port: int, tmp: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault(distributed.TIMEOUT_ENV, "20")
    torch.set_num_threads(1)
    try:
        distributed.init(args[0] if args and args[0] == "cuda" else "cpu")
        fn(Path(tmp), *args)
    except BaseException as err:  # the parent reads what went wrong
        Path(tmp, f"error{local_rank}.txt").write_text(
            distributed.fail_message(err) + "\n" + traceback.format_exc()
        )
        distributed.close()
        raise
    distributed.close(wait=True)


def spawn(fn, tmp: Path, *args, world: int = WORLD, check: bool = True) -> None:
    """Run `fn(tmp, *args)` on `world` gloo ranks; raise with the ranks' errors if one fails."""
    try:
        mp.start_processes(
            _entry,
            args=(fn, world, free_port(), str(tmp), args),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException:
        if check:
            errors = "\n".join(p.read_text() for p in sorted(tmp.glob("error*.txt")))
            raise AssertionError(errors) from None


def micro_model(seed: int = 0) -> Transformer:
    from conftest import randomize_

    return microbatch_model(seed, randomize_)


SETTINGS = dict(beta=0.04, mu=2, mini_batches=2, micro_batch_size=2)


def grpo_update(
    sharded: bool, device: str = "cpu", packed: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One GRPO step (2 epochs x 2 mini-batches, KL to a reference) on a fixed rollout, on
    the padded or the packed path (under FSDP2 the packed one runs each layer's function
    as that layer's forward, `run_with_weights`)."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    policy, ref = micro_model(0).to(device), micro_model(1).eval().to(device)
    if sharded:
        distributed.shard_model(policy)
    optimizer = make_optimizer(policy, 1e-3, weight_decay=0.1)
    settings = UpdateSettings(aggregation="token-mean", packed=packed, **SETTINGS)
    stats = update_on_rollout(policy, optimizer, rollout_batch(10), settings, step=1, ref_model=ref)
    state = distributed.full_state_dict(policy)
    return stats, {k: v.detach().cpu().clone() for k, v in state.items()}


def _grpo_worker(tmp: Path, device: str = "cpu", packed: bool = False) -> None:
    stats, weights = grpo_update(True, distributed.local_device(device), packed)
    if distributed.is_main():
        torch.save({"stats": stats, "weights": weights}, tmp / "grpo.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=TOL, msg=k)


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_grpo_step_on_two_ranks_matches_one_process(tmp_path, packed):
    spawn(_grpo_worker, tmp_path, "cpu", packed)
    got = torch.load(tmp_path / "grpo.pt")
    stats, weights = grpo_update(sharded=False, packed=packed)
    for key in ("loss", "kl", "entropy", "grad_norm", "train_tokens"):
        assert abs(got["stats"][key] - stats[key]) <= TOL * max(1.0, abs(stats[key])), key
    assert got["stats"]["optimizer_steps"] == stats["optimizer_steps"] == 4
    assert_same_weights(got["weights"], weights)


def sft_rows(n: int = 5, width: int = 16, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, width), generator=gen)
    pos = torch.arange(width).repeat(n, 1)
    mask = (torch.rand((n, width), generator=gen) > 0.3).long()
    return ids, pos, mask


def sft_steps(sharded: bool, steps: int = 2):
    """SFT steps of the supervised loop (micro-batches of 2 rows); losses, norms, weights."""
    from r1lab.stages.lm_loss import train_step
    from r1lab.stages.supervised import _FiniteStep, sharded_train_step

    model = micro_model(0).train()
    if sharded:
        distributed.shard_model(model)
    optimizer = _FiniteStep(make_optimizer(model, 1e-3, 0.1))
    step = sharded_train_step if sharded else train_step
    out = [step(model, optimizer, sft_rows(seed=s), 2, 1.0, nullcontext()) for s in range(steps)]
    weights = {k: v.detach().clone() for k, v in distributed.full_state_dict(model).items()}
    return out, weights, model, optimizer.optimizer


def _sft_worker(tmp: Path) -> None:
    out, weights, _, _ = sft_steps(sharded=True)
    if distributed.is_main():
        torch.save({"out": out, "weights": weights}, tmp / "sft.pt")


def test_sft_step_on_two_ranks_matches_one_process(tmp_path):
    spawn(_sft_worker, tmp_path)
    got = torch.load(tmp_path / "sft.pt")
    out, weights, _, _ = sft_steps(sharded=False)
    for (loss2, norm2), (loss1, norm1) in zip(got["out"], out):
        assert abs(loss2 - loss1) <= TOL and abs(norm2 - norm1) <= TOL
    assert_same_weights(got["weights"], weights)


def _checkpoint_worker(tmp: Path) -> None:
    from r1lab.snapshot import TrainingSnapshot, save_checkpoint

    _, weights, model, optimizer = sft_steps(sharded=True, steps=1)
    save_checkpoint(
        tmp / "run",
        TrainingSnapshot(model=model, optimizer=optimizer),
        model,
        None,
        1,
        {"epoch": 0},
        {"note": "two ranks"},
        torch.float32,
    )
    from r1lab.stages.supervised import _FiniteStep, sharded_train_step

    sharded_train_step(model, _FiniteStep(optimizer), sft_rows(seed=1), 2, 1.0, nullcontext())
    after = {k: v.detach().clone() for k, v in distributed.full_state_dict(model).items()}
    if distributed.is_main():
        torch.save({"saved": weights, "after": after}, tmp / "ckpt.pt")


def test_checkpoint_written_on_two_ranks_resumes_on_one(tmp_path):
    from r1lab.model.checkpoint import load_model
    from r1lab.snapshot import TrainingSnapshot, restore_checkpoint
    from r1lab.stages.lm_loss import train_step
    from r1lab.stages.supervised import _FiniteStep

    spawn(_checkpoint_worker, tmp_path)
    got = torch.load(tmp_path / "ckpt.pt")
    assert (tmp_path / "run" / "state" / "dcp").is_dir()
    assert_same_weights(load_model(tmp_path / "run" / "model").state_dict(), got["saved"])
    model = micro_model(5).train()  # other weights: all must come from the checkpoint
    optimizer = make_optimizer(model, 1e-3, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading on one process is intended: no warning
        info = restore_checkpoint(
            tmp_path / "run", TrainingSnapshot(model=model, optimizer=optimizer)
        )
    assert info["step"] == 1 and info["extra"] == {"note": "two ranks"}
    assert_same_weights(model.state_dict(), got["saved"])
    train_step(model, _FiniteStep(optimizer), sft_rows(seed=1), 2, 1.0, nullcontext())
    assert_same_weights(model.state_dict(), got["after"])  # the optimizer state came too


def _fingerprint_worker(tmp: Path) -> None:
    distributed.check_agreement("abc" if distributed.rank() == 0 else "xyz")


def test_rank_with_another_config_fails_naming_it(tmp_path):
    start = time.perf_counter()
    spawn(_fingerprint_worker, tmp_path, check=False)
    errors = [p.read_text() for p in sorted(tmp_path.glob("error*.txt"))]
    assert len(errors) == WORLD
    for text in errors:
        assert "rank 1 has config fingerprint xyz, rank 0 has abc" in text
    assert time.perf_counter() - start < 30


def test_nproc_launches_torchrun():
    cmd = distributed.torchrun_command(["sft", "--nproc", "2", "--out", "x", "lr=1e-5"])
    i = cmd.index("--nproc-per-node")
    assert cmd[i + 1] == "2" and "--no-python" in cmd
    assert cmd[-4:] == ["sft", "--out", "x", "lr=1e-5"]
    assert cmd[-7:-4] == [sys.executable, "-m", "r1lab.cli"]  # this interpreter's r1lab
    assert distributed.torchrun_command(["sft", "--out", "x"]) is None
    assert distributed.torchrun_command(["sft", "--nproc=1", "--out", "x"]) is None
    with pytest.raises(ValueError, match="--nproc"):
        distributed.torchrun_command(["sft", "--nproc", "two"])


def die_when_logged(step: int) -> None:
    """In this worker, raise `Killed` on every rank as `step`'s training record is logged
    (rank 0 writes metrics.jsonl, the others a NullLog), as a kill would stop the run."""
    import test_recipe_pins as pins

    def dies(real):
        def write(self, record: dict) -> None:
            if record.get("step") == step and "loss" in record:
                raise pins.Killed
            real(self, record)

        return write

    pins.MetricsLog.write = dies(pins.MetricsLog.write)
    distributed.NullLog.write = dies(distributed.NullLog.write)


def killed_when_logged(step: int, tmp: Path, run) -> None:
    """`run()` in this worker, killed on every rank as `step` is logged: each rank leaves
    `killed<rank>` in tmp when the kill came."""
    import test_recipe_pins as pins

    os.environ["R1LAB_NO_PROGRESS"] = "1"
    die_when_logged(step)
    try:
        run()
    except pins.Killed:
        Path(tmp, f"killed{distributed.rank()}").touch()


def _grpo_stage_worker(tmp: Path) -> None:
    """The grpo stage on 2 ranks, killed (on both) as step 3 is logged; step 2 was saved."""
    import test_recipe_pins as pins

    from r1lab.stages import grpo

    sys.path.insert(0, str(tmp))
    config = pins.grpo_config(tmp / "base", "pinrewards:spread")
    killed_when_logged(3, tmp, lambda: grpo.run(config, tmp / "run"))


def test_grpo_stage_killed_on_two_ranks_resumes_on_one(tmp_path):
    import json

    import test_recipe_pins as pins

    from r1lab.stages import grpo

    pins.micro_model_dir(tmp_path / "base")
    (tmp_path / "pinrewards.py").write_text(pins.REWARDS_MODULE)
    spawn(_grpo_stage_worker, tmp_path)
    out = tmp_path / "run"
    assert (tmp_path / "killed0").exists() and (tmp_path / "killed1").exists()
    assert (out / "state" / "dcp").is_dir() and not (out / "DONE").exists()
    sys.path.insert(0, str(tmp_path))
    try:
        summary = grpo.run(pins.grpo_config(tmp_path / "base", "pinrewards:spread"), out)
    finally:
        sys.path.remove(str(tmp_path))
    assert summary["steps"] == pins.STEPS and (out / "DONE").exists()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in steps if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(r["loss"] is not None and r["kl"] is not None for r in losses)


def _resume_on_two_worker(tmp: Path) -> None:
    from r1lab.snapshot import TrainingSnapshot, restore_checkpoint
    from r1lab.stages.supervised import _FiniteStep, sharded_train_step

    model = micro_model(5).train()
    distributed.shard_model(model)
    optimizer = make_optimizer(model, 1e-3, 0.1)
    info = restore_checkpoint(tmp / "run", TrainingSnapshot(model=model, optimizer=optimizer))
    sharded_train_step(model, _FiniteStep(optimizer), sft_rows(seed=1), 2, 1.0, nullcontext())
    after = {k: v.detach().clone() for k, v in distributed.full_state_dict(model).items()}
    if distributed.is_main():
        torch.save({"step": info["step"], "after": after}, tmp / "resumed.pt")


def test_checkpoint_written_by_one_process_resumes_on_two_ranks(tmp_path):
    from r1lab.snapshot import TrainingSnapshot, save_checkpoint
    from r1lab.stages.lm_loss import train_step
    from r1lab.stages.supervised import _FiniteStep

    _, _, model, optimizer = sft_steps(sharded=False, steps=1)
    snapshot = TrainingSnapshot(model=model, optimizer=optimizer)
    save_checkpoint(tmp_path / "run", snapshot, model, None, 1, {}, {}, torch.float32)
    assert not (tmp_path / "run" / "state" / "dcp").exists()
    train_step(model, _FiniteStep(optimizer), sft_rows(seed=1), 2, 1.0, nullcontext())
    spawn(_resume_on_two_worker, tmp_path)
    got = torch.load(tmp_path / "resumed.pt")
    assert got["step"] == 1
    assert_same_weights(got["after"], model.state_dict())  # weights and AdamW moments


def test_cli_nproc_runs_grpo_under_torchrun(tmp_path):
    """`r1lab grpo --nproc 2`: torchrun, gloo, one run dir written by rank 0, state/dcp."""
    import json
    import subprocess

    import test_recipe_pins as pins
    import yaml

    pins.micro_model_dir(tmp_path / "base")
    (tmp_path / "pinrewards.py").write_text(pins.REWARDS_MODULE)
    cfg = pins.grpo_config(tmp_path / "base", "pinrewards:spread").model_dump(mode="json")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"grpo": cfg}))
    path = os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])  # r1lab uninstalled
    env = {**os.environ, "PYTHONPATH": path, "R1LAB_NO_PROGRESS": "1"}
    env.update(OMP_NUM_THREADS="1", R1LAB_DIST_TIMEOUT_S="30")
    cmd = [sys.executable, "-m", "r1lab.cli", "grpo", "--nproc", "2", "--preset", "p.yaml"]
    done = subprocess.run(
        [*cmd, "--out", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "DONE").read_text())["steps"] == pins.STEPS
    assert (run / "state" / "dcp").is_dir() and (run / "model" / "config.json").exists()
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # one writer


def _one_rank_dies_worker(tmp: Path) -> None:
    if distributed.rank() == 1:
        raise ValueError("rank 1 could not read its data")
    distributed.all_reduce_sum(1.0)  # waits for rank 1, which is gone


def test_a_failing_rank_ends_the_others_without_a_hang(tmp_path):
    start = time.perf_counter()
    spawn(_one_rank_dies_worker, tmp_path, check=False)
    assert (
        "rank 1 of 2: ValueError: rank 1 could not read its data"
        in (tmp_path / "error1.txt").read_text()
    )
    assert time.perf_counter() - start < 30


# ---- dynamic sampling ------------------------------------------------------------------------
DYNAMIC_REWARDS = '''
def half_flat(prompts, completions, **columns):
    """No spread for about half the questions (dynamic sampling drops their groups and
    draws more), a spread by completion length for the others."""
    return [
        (len(c) % 5) / 4 if sum(map(ord, p)) % 2 else 0.0 for p, c in zip(prompts, completions)
    ]
'''


def dynamic_grpo_config(tmp: Path):
    """The pinned GRPO run with 4 questions a step, dynamic sampling and 2 refill rounds."""
    import test_recipe_pins as pins

    cfg = pins.grpo_config(tmp / "base", "dsrewards:half_flat")
    update = {"steps": 3, "questions_per_step": 4, "dynamic_sampling": True, "max_resample": 2}
    return cfg.model_copy(update=update)


def dynamic_inputs(tmp: Path) -> None:
    import test_recipe_pins as pins

    pins.micro_model_dir(tmp / "base")
    (tmp / "dsrewards.py").write_text(DYNAMIC_REWARDS)


def dynamic_rollouts(tmp: Path, rank: int, world: int, steps: int = 3) -> list[dict]:
    """With the base weights, steps 1..`steps` of `dynamic_grpo_config`'s rollouts: this
    rank's groups, by (round, index, prompt, completion ids), and the batch gathered from
    every rank."""
    from r1lab.model.checkpoint import load_model
    from r1lab.model.tokenizer import load_tokenizer
    from r1lab.stages import grpo
    from r1lab.stages.judging import prompt_template
    from r1lab.stages.rollout import collect_rollout, step_batch

    cfg = dynamic_grpo_config(tmp)
    model = load_model(tmp / "base", dtype=torch.float32)
    tokenizer = load_tokenizer(tmp / "base")
    _, _, mixture = grpo.task_sets(cfg)
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p}
    sampling["max_new_tokens"] = cfg.max_new_tokens
    out = []
    for step in range(1, steps + 1):
        rollout = collect_rollout(
            model, tokenizer, mixture, grpo.reward_sets(cfg)[0], step=step, seed=cfg.seed,
            questions=cfg.questions_per_step, group_size=cfg.group_size,
            template=prompt_template(cfg.template)[0], sampling=sampling,
            dynamic_sampling=True, max_resample=cfg.max_resample, rank=rank, world=world,
        )  # fmt: skip
        groups = [
            (*g.order, g.prompt, [c.token_ids for c in g.completions]) for g in rollout.groups
        ]
        sampled = [g.order for g in rollout.sampled]
        gathered = step_batch(
            rollout.groups, group_size=cfg.group_size, adv_scale="batch",
            adv_baseline="mean", mask_truncated=False,
        )  # fmt: skip
        out.append(
            {"groups": groups, "sampled": sampled, "rounds": rollout.rounds, "batch": gathered}
        )
    return out


def _dynamic_rollout_worker(tmp: Path) -> None:
    sys.path.insert(0, str(tmp))
    rank = distributed.rank()
    torch.save(dynamic_rollouts(tmp, rank, distributed.world_size()), tmp / f"rollout{rank}.pt")


def test_dynamic_sampling_rollout_on_two_ranks_is_the_one_process_rollout(tmp_path, monkeypatch):
    """Every refill round draws the one-process questions with its keys, each rank samples
    its share: the two ranks' kept groups, and the batch gathered from them, are one
    process's, in its (round, index) order. The steps cover a rank whose refill share is
    empty (1 question needed) and groups of two rounds kept on one rank."""
    dynamic_inputs(tmp_path)
    spawn(_dynamic_rollout_worker, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    one = dynamic_rollouts(tmp_path, 0, 1)
    ranks = [torch.load(tmp_path / f"rollout{r}.pt", weights_only=False) for r in range(WORLD)]
    assert any(step["rounds"] > 1 for step in one)  # refills happened
    last_sampled = [max(o for o, _ in r[i]["sampled"]) for r in ranks for i in range(3)]
    last_round = [r[i]["rounds"] - 1 for r in ranks for i in range(3)]
    assert any(s < r for s, r in zip(last_sampled, last_round))  # a rank with an empty share
    rank_by_rank = [[g for r in ranks for g in r[i]["groups"]] for i in range(3)]
    assert rank_by_rank != [step["groups"] for step in one]  # not one process's order as is
    for i, step in enumerate(one):
        two = [r[i] for r in ranks]
        assert two[0]["rounds"] == two[1]["rounds"] == step["rounds"]
        assert sorted(two[0]["groups"] + two[1]["groups"]) == step["groups"]
        for rank in two:  # every rank trains on the one-process batch
            got, want = rank["batch"], step["batch"]
            for field in ("prompt_ids", "completion_ids", "counted"):
                assert getattr(got, field) == getattr(want, field), field
            torch.testing.assert_close(got.advantages, want.advantages)
            # a batch of other rows rounds the fp32 logits' sums otherwise, in the last bits
            for x, y in zip(got.sampler_logprobs, want.sampler_logprobs, strict=True):
                torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=TOL, rtol=TOL)


def _dynamic_grpo_stage_worker(tmp: Path) -> None:
    from r1lab.stages import grpo

    sys.path.insert(0, str(tmp))
    os.environ["R1LAB_NO_PROGRESS"] = "1"
    grpo.run(dynamic_grpo_config(tmp), tmp / "run2")


def test_grpo_stage_with_dynamic_sampling_on_two_ranks_matches_one_process(tmp_path, monkeypatch):
    """Refill rounds on 2 ranks draw, keep and train on what one process does: the same
    rewards, losses and kept groups step after step, and the same final weights."""
    import json

    from r1lab.model.checkpoint import load_model
    from r1lab.stages import grpo

    dynamic_inputs(tmp_path)
    spawn(_dynamic_grpo_stage_worker, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    grpo.run(dynamic_grpo_config(tmp_path), tmp_path / "run1")

    def logged(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if '"loss"' in x]

    one, two = logged("run1"), logged("run2")
    assert len(one) == 3 and any(r["dynamic_sampling/rounds"] > 1 for r in one)
    for a, b in zip(one, two, strict=True):
        for key in ("dynamic_sampling/rounds", "dynamic_sampling/kept_groups"):
            assert b[key] == a[key], key
        for key in ("reward", "reward_std", "frac_reward_zero_std", "loss", "kl", "grad_norm"):
            assert abs(b[key] - a[key]) <= TOL * max(1.0, abs(a[key])), key
    one_weights = load_model(tmp_path / "run1" / "model", dtype=torch.float32).state_dict()
    two_weights = load_model(tmp_path / "run2" / "model", dtype=torch.float32).state_dict()
    assert_same_weights(two_weights, one_weights)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_grpo_step_on_two_gpus_matches_one(tmp_path, packed):
    """The same check on NCCL: 2 GPUs against one, fp32 without TF32."""
    spawn(_grpo_worker, tmp_path, "cuda", packed)
    got = torch.load(tmp_path / "grpo.pt")
    stats, weights = grpo_update(sharded=False, device="cuda", packed=packed)
    for key in ("loss", "kl", "entropy", "grad_norm", "train_tokens"):
        assert abs(got["stats"][key] - stats[key]) <= 1e-4 * max(1.0, abs(stats[key])), key
    for k in weights:
        torch.testing.assert_close(got["weights"][k], weights[k], atol=1e-4, rtol=1e-4, msg=k)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---- LoRA: data parallel, every rank holding the base and adapters whole ----------------------
LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


def lora_grpo_config(tmp: Path):
    import test_recipe_pins as pins

    from r1lab.config import build_config
    from r1lab.stages import grpo

    cfg = pins.grpo_config(tmp / "base", "pinrewards:spread").model_dump()
    cfg.update(lora=LORA, lr=2e-2, save_every=2, questions_per_step=4)
    return build_config(grpo.Config, cfg)


def _lora_grpo_worker(tmp: Path) -> None:
    """The LoRA grpo stage on 2 ranks, killed (on both) as step 3 is logged; step 2 was saved."""
    from r1lab.stages import grpo

    sys.path.insert(0, str(tmp))
    killed_when_logged(3, tmp, lambda: grpo.run(lora_grpo_config(tmp), tmp / "run2"))


def test_lora_grpo_on_two_ranks_matches_one_process_and_resumes_on_one(tmp_path, monkeypatch):
    """LoRA GRPO under torchrun: each rank trains its share and the adapters' gradients are
    summed over ranks, so 2 ranks log the one-process losses step by step; killed after its
    step-2 checkpoint, the run resumes on one process and ends with the adapters of a
    one-process run never killed."""
    import json

    import test_recipe_pins as pins
    from safetensors.torch import load_file

    from r1lab.stages import grpo

    pins.micro_model_dir(tmp_path / "base")
    (tmp_path / "pinrewards.py").write_text(pins.REWARDS_MODULE)
    spawn(_lora_grpo_worker, tmp_path)
    assert (tmp_path / "killed0").exists() and (tmp_path / "killed1").exists()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    grpo.run(lora_grpo_config(tmp_path), tmp_path / "run2")  # resumes on one process
    grpo.run(lora_grpo_config(tmp_path), tmp_path / "run1")

    def logged(run: str) -> dict[int, dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}

    two, one = logged("run2"), logged("run1")
    assert sorted(two) == sorted(one) == list(range(1, pins.STEPS + 1))
    assert any(abs(r["loss"]) > 1e-6 for r in one.values())  # the adapters do get a gradient
    for step, want in one.items():
        for key in ("reward", "loss", "kl", "grad_norm"):
            assert two[step][key] == pytest.approx(want[key], abs=1e-5), (step, key)
    a = load_file(tmp_path / "run2" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run1" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOL, rtol=TOL, msg=k)
