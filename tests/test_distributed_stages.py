"""Whole stages on two gloo ranks write what one process writes (issue 15).

GRPO samples the one-process completions (sampling keyed per question and sample) and
ends with its losses and weights; sft and pretrain log its losses, and eval and
rejection sampling split the questions and write its files; rank 0 alone writes each run
dir. The harness (`spawn`) is tests/test_distributed.py's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import TOL, WORLD, assert_same_weights, killed_when_logged, spawn

from r1lab import distributed


def sampling_grpo_config(tmp: Path):
    """The pinned GRPO run with more questions than ranks, nucleus sampling at T=1, and the
    reference (sharded like the policy under torchrun) refreshed before step 3."""
    import test_recipe_pins as pins

    cfg = pins.grpo_config(tmp / "base", "pinrewards:spread")
    update = {"steps": 3, "questions_per_step": 4, "top_p": 0.9, "ref_refresh_every": 2}
    return cfg.model_copy(update=update)


def record_completions(grpo_module, seen: list) -> None:
    """Make the grpo stage note every question and its sampled tokens, step by step."""
    real = grpo_module.collect_rollout

    def collect(*args, **kwargs):
        rollout = real(*args, **kwargs)
        seen.append(
            [
                (kwargs["step"], g.example.question, [c.token_ids for c in g.completions])
                for g in rollout.sampled
            ]
        )
        return rollout

    grpo_module.collect_rollout = collect


def _grpo_samples_worker(tmp: Path) -> None:
    from r1lab.stages import grpo

    sys.path.insert(0, str(tmp))
    os.environ["R1LAB_NO_PROGRESS"] = "1"
    seen: list = []
    record_completions(grpo, seen)
    grpo.run(sampling_grpo_config(tmp), tmp / "run2")
    torch.save(seen, tmp / f"samples{distributed.rank()}.pt")


def test_grpo_stage_on_two_ranks_samples_what_one_process_samples(tmp_path, monkeypatch):
    """Each question is sampled with its (seed, step, round, question) key, so the 2 ranks
    draw exactly the one-process completions, step after step, and the losses and final
    weights follow (fp32, to 1e-5)."""
    import json

    import test_recipe_pins as pins

    from r1lab.model.checkpoint import load_model
    from r1lab.stages import grpo

    pins.micro_model_dir(tmp_path / "base")
    (tmp_path / "pinrewards.py").write_text(pins.REWARDS_MODULE)
    spawn(_grpo_samples_worker, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    seen: list = []
    monkeypatch.setattr(grpo, "collect_rollout", grpo.collect_rollout)  # restored afterwards
    record_completions(grpo, seen)
    grpo.run(sampling_grpo_config(tmp_path), tmp_path / "run1")
    ranks = [torch.load(tmp_path / f"samples{r}.pt") for r in range(WORLD)]
    assert len(seen) == 3 and all(len(r) == 3 for r in ranks)
    for step, one in enumerate(seen):
        assert ranks[0][step] + ranks[1][step] == one  # rank order = one process's order
        assert len(ranks[0][step]) == len(ranks[1][step]) == 2

    def logged(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if '"loss"' in x]

    steps = list(zip(logged("run1"), logged("run2"), strict=True))
    assert steps[2][0]["kl"] < steps[1][0]["kl"]  # the refreshed reference is the policy
    for a, b in steps:
        assert b["reward"] == a["reward"]  # the same completions, the same scores
        for key in ("loss", "kl", "grad_norm", "entropy"):
            assert abs(b[key] - a[key]) <= TOL * max(1.0, abs(a[key])), key
    one = load_model(tmp_path / "run1" / "model", dtype=torch.float32).state_dict()
    two = load_model(tmp_path / "run2" / "model", dtype=torch.float32).state_dict()
    assert_same_weights(two, one)


def note_mark_done(module, tmp: Path) -> None:
    """Leave `marked<rank>` in tmp when this rank writes a DONE (only rank 0 may)."""
    real = module.mark_done

    def mark(*args, **kwargs):
        Path(tmp, f"marked{distributed.rank()}").touch()
        return real(*args, **kwargs)

    module.mark_done = mark


def _sft_stage_worker(tmp: Path) -> None:
    import test_recipe_pins as pins

    from r1lab.stages import sft

    os.environ["R1LAB_NO_PROGRESS"] = "1"
    note_mark_done(sft, tmp)
    sft.run(pins.sft_config(tmp / "base", tmp / "sft.jsonl"), tmp / "run")


def test_sft_stage_on_two_ranks_logs_the_one_process_losses(tmp_path):
    """The pinned one-process SFT losses (tests/test_recipe_pins.py), from 2 ranks; rank 0
    alone writes DONE."""
    import test_recipe_pins as pins

    pins.micro_model_dir(tmp_path / "base")
    pins.write_jsonl(tmp_path / "sft.jsonl", pins.worked_examples(80))
    spawn(_sft_stage_worker, tmp_path)
    pins.assert_pinned(pins.logged(tmp_path / "run", "loss"), pins.SFT_LOSS, "sft loss, 2 ranks")
    assert (tmp_path / "run" / "state" / "dcp").is_dir() and (tmp_path / "run" / "DONE").exists()
    assert sorted(p.name for p in tmp_path.glob("marked*")) == ["marked0"]


def _pretrain_stage_worker(tmp: Path) -> None:
    import test_recipe_pins as pins

    from r1lab import training
    from r1lab.stages import pretrain

    os.environ["R1LAB_NO_PROGRESS"] = "1"
    note_mark_done(training, tmp)
    if distributed.rank() == 1:  # a rank that trained its own tokenizer would fail here
        pretrain.train_tokenizer = None
    pretrain.run(pins.pretrain_config(), tmp / "run2")


def test_pretrain_stage_on_two_ranks_matches_one_process(tmp_path, monkeypatch):
    """pretrain on 2 ranks: rank 0 trains the tokenizer and hands it over, rank 0 alone
    writes DONE, and the losses and final weights are the one-process ones."""
    import test_recipe_pins as pins

    from r1lab.model.checkpoint import load_model
    from r1lab.stages import pretrain

    spawn(_pretrain_stage_worker, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("marked*")) == ["marked0"]
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    pretrain.run(pins.pretrain_config(), tmp_path / "run1")
    one, two = pins.logged(tmp_path / "run1", "loss"), pins.logged(tmp_path / "run2", "loss")
    assert len(one) == pins.STEPS
    pins.assert_pinned(two, one, "pretrain loss, 2 ranks")
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / "run2" / "model" / name).read_text() == (
            tmp_path / "run1" / "model" / name
        ).read_text()
    weights = [load_model(tmp_path / r / "model").state_dict() for r in ("run1", "run2")]
    assert_same_weights(weights[1], weights[0])


def reward_model_config(tmp: Path):
    """The pinned reward-model run (tests/test_recipe_pins.py), in batches of 7 of its 36
    training pairs: the last batch holds one pair, so rank 1's share of it is empty."""
    import test_recipe_pins as pins

    cfg = pins.reward_model_config(tmp / "base", tmp / "pairs.jsonl")
    return cfg.model_copy(update={"batch_size": 7, "save_every": 2})


def reward_model_inputs(tmp: Path) -> None:
    import test_recipe_pins as pins

    pins.micro_model_dir(tmp / "base")
    pins.write_jsonl(tmp / "pairs.jsonl", pins.preference_pairs(40))


def reward_model_weights(run: Path) -> dict[str, torch.Tensor]:
    """The saved reward model's weights (decoder and head) by name."""
    from r1lab.stages.reward_model import load_reward_model

    return {
        k: v.detach().clone() for k, v in load_reward_model(run / "model")[0].state_dict().items()
    }


def _reward_model_worker(tmp: Path) -> None:
    from r1lab import training
    from r1lab.stages import reward_model

    os.environ["R1LAB_NO_PROGRESS"] = "1"
    note_mark_done(training, tmp)
    reward_model.run(reward_model_config(tmp), tmp / "run2")


def test_reward_model_stage_on_two_ranks_matches_one_process(tmp_path, monkeypatch):
    """reward-model on 2 ranks: each scores its share of every batch of pairs (one rank's
    share of the last is empty), and the losses, accuracies, held-out accuracy and final
    weights (decoder and head) are the one-process ones; rank 0 alone writes DONE."""
    import json

    import test_recipe_pins as pins

    from r1lab.stages import reward_model

    reward_model_inputs(tmp_path)
    spawn(_reward_model_worker, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("marked*")) == ["marked0"]
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    reward_model.run(reward_model_config(tmp_path), tmp_path / "run1")
    one, two = tmp_path / "run1", tmp_path / "run2"
    assert len(pins.logged(one, "loss")) == 6  # 36 pairs in batches of 7
    for key in ("loss", "accuracy", "margin", "grad_norm"):
        pins.assert_pinned(pins.logged(two, key), pins.logged(one, key), f"{key}, 2 ranks")
    done = [json.loads((run / "DONE").read_text()) for run in (one, two)]
    for key in ("heldout_pair_accuracy", "heldout_pair_accuracy_before", "steps"):
        assert done[1][key] == done[0][key], key
    assert (two / "state" / "dcp").is_dir() and not (one / "state" / "dcp").exists()
    assert_same_weights(reward_model_weights(two), reward_model_weights(one))


def _reward_model_resume_worker(tmp: Path) -> None:
    """Resume the run killed on one process, on 2 ranks; die as step 5 is logged."""
    from r1lab.stages import reward_model

    run = lambda: reward_model.run(reward_model_config(tmp), tmp / "killed")  # noqa: E731
    killed_when_logged(5, tmp, run)


def test_reward_model_resumes_across_world_sizes(tmp_path, monkeypatch):
    """Killed on one process after its step-2 checkpoint, resumed on 2 ranks and killed
    after step 4, finished on one process: the losses and weights of a run never killed."""
    import test_recipe_pins as pins

    from r1lab.stages import reward_model

    reward_model_inputs(tmp_path)
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    cfg, killed = reward_model_config(tmp_path), tmp_path / "killed"
    reward_model.run(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        patch.setattr(pins.MetricsLog, "write", pins.killed_after(2))
        with pytest.raises(pins.Killed):
            reward_model.run(cfg, killed)
    spawn(_reward_model_resume_worker, tmp_path)
    assert (tmp_path / "killed0").exists() and (tmp_path / "killed1").exists()
    assert (killed / "state" / "dcp").is_dir() and not (killed / "DONE").exists()
    summary = reward_model.run(cfg, killed)
    assert summary["steps"] == 6 and (killed / "DONE").exists()
    straight = pins.logged(tmp_path / "straight", "loss")
    assert pins.logged(killed, "step") == [1, 2, 3, 4, 5, 6]
    pins.assert_pinned(pins.logged(killed, "loss"), straight, "loss, resumed on 2 then 1")
    assert_same_weights(reward_model_weights(killed), reward_model_weights(tmp_path / "straight"))


def sampler_configs(tmp: Path):
    """eval on two sets (5 and 3 questions: shares of 3 and 2, of 2 and 1) and rejection
    sampling on the random micro model, batches smaller than a rank's share."""
    from r1lab.config import build_config
    from r1lab.stages import evaluate, rejection

    common = {"model": str(tmp / "base"), "max_new_tokens": 8, "device": "cpu"}
    sets = [{"name": "chain_sum", "n": 5}, {"name": "arithmetic", "n": 3}]
    ev = build_config(evaluate.Config, {**common, "tasks": sets, "k": 2, "max_batch_size": 2})
    rej = build_config(
        rejection.Config,
        {**common, "tasks": sets[:1], "samples_per_question": 3, "max_batch_size": 3},
        {"min_kept": 0, "temperature": 1.0},
    )
    return ev, rej


def _samplers_worker(tmp: Path) -> None:
    from r1lab.stages import evaluate, judging, rejection

    os.environ["R1LAB_NO_PROGRESS"] = "1"
    asked: list[int] = []
    real = judging.sample_questions

    def sample_questions(model, tokenizer, template, questions, *args, **kwargs):
        asked.append(len(questions))
        return real(model, tokenizer, template, questions, *args, **kwargs)

    judging.sample_questions = sample_questions
    ev, rej = sampler_configs(tmp)
    note_mark_done(evaluate, tmp)
    evaluate.run(ev, tmp / "eval2")
    note_mark_done(rejection, tmp)
    rejection.run(rej, tmp / "rej2")
    Path(tmp, f"asked{distributed.rank()}").write_text(str(asked))


def test_eval_and_rejection_on_two_ranks_write_the_one_process_results(tmp_path, monkeypatch):
    """Each rank samples and judges its share of every set (question i keyed by (seed,
    i)); rank 0 gathers them and alone writes the run dirs, which hold what one process
    writes."""
    import json

    from conftest import save_random_micro_model

    from r1lab.stages import evaluate, rejection

    save_random_micro_model(tmp_path / "base")
    spawn(_samplers_worker, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("marked*")) == ["marked0"]
    asked = [(tmp_path / f"asked{r}").read_text() for r in range(WORLD)]
    assert asked == ["[3, 2, 3]", "[2, 1, 2]"]  # questions per set: each rank its share
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    ev, rej = sampler_configs(tmp_path)
    evaluate.run(ev, tmp_path / "eval1")
    rejection.run(rej, tmp_path / "rej1")

    def read(path: Path) -> str:
        return path.read_text()

    def without(record: dict, *keys: str) -> dict:
        return {k: v for k, v in record.items() if k not in keys}

    one, two = tmp_path / "eval1", tmp_path / "eval2"
    assert read(two / "samples.jsonl") == read(one / "samples.jsonl")
    assert len(read(one / "samples.jsonl").splitlines()) == (5 + 3) * 2
    sets = [json.loads(read(d / "eval.json"))["sets"] for d in (one, two)]
    assert {k: without(v, "timing") for k, v in sets[1].items()} == {
        k: without(v, "timing") for k, v in sets[0].items()
    }
    one, two = tmp_path / "rej1", tmp_path / "rej2"
    rows = [[json.loads(x) for x in read(d / "rejected.jsonl").splitlines()] for d in (one, two)]
    assert len(rows[0]) == 5 * 3 and len({r["response"] for r in rows[0]}) > 5
    assert [without(r, "provenance") for r in rows[1]] == [
        without(r, "provenance") for r in rows[0]
    ]
    summaries = [json.loads(read(d / "rejection.json")) for d in (one, two)]
    assert summaries[1]["total"] == summaries[0]["total"]
    assert (two / "DONE").exists() and (two / "config.yaml").exists()


def test_nproc_1_runs_the_stage_in_this_process(tmp_path, monkeypatch):
    """`r1lab eval --nproc 1` is accepted (no torchrun) and runs here."""
    from conftest import save_random_micro_model

    from r1lab import cli

    save_random_micro_model(tmp_path / "base")
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    argv = ["eval", "--nproc", "1", "--out", str(tmp_path / "eval")]
    settings = [f"model={tmp_path / 'base'}", "n=2", "k=1", "max_new_tokens=4", "device=cpu"]
    assert cli.main([*argv, *settings]) == 0
    assert (tmp_path / "eval" / "DONE").exists()
    with pytest.raises(SystemExit):
        cli.main(["eval", "--nproc", "0", "--out", str(tmp_path / "x"), *settings])


def test_pipeline_runs_its_stages_on_two_processes(tmp_path, monkeypatch):
    """`r1lab run --nproc 2`: the stage and its evaluation each run under torchrun and
    write what the one-process pipeline writes; a rerun on one process reuses them."""
    import json

    import test_recipe_pins as pins

    from r1lab import pipeline

    checkout = str(Path(__file__).parents[1])  # the subprocesses import this r1lab
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "60")
    one, two = tmp_path / "one", tmp_path / "two"
    pipeline.run_pipeline("micro", str(two), only="base", nproc=2)
    pipeline.run_pipeline("micro", str(one), only="base", nproc=1)
    assert (two / "base" / "state" / "dcp").is_dir()  # it did run on 2 ranks
    pins.assert_pinned(
        pins.logged(two / "base", "loss"), pins.logged(one / "base", "loss"), "base loss"
    )
    for run in (one, two):
        assert (run / "eval" / "base" / "DONE").exists()
    samples = [(r / "eval" / "base" / "samples.jsonl").read_text() for r in (one, two)]
    assert samples[1] == samples[0]
    done = (two / "base" / "DONE").read_text()
    pipeline.run_pipeline("micro", str(two), only="base", nproc=1)
    assert (two / "base" / "DONE").read_text() == done  # same fingerprint: reused
    assert json.loads(done)["stage"] == "pretrain"


# ---- time budgets: the ranks stop on one clock ------------------------------------------------
AHEAD_S = 3600.0  # rank 1's clock runs this far ahead of rank 0's (a slow start, say)


def _grpo_clock_worker(tmp: Path) -> None:
    import test_recipe_pins as pins

    from r1lab.stages import grpo, grpo_state

    sys.path.insert(0, str(tmp))
    os.environ["R1LAB_NO_PROGRESS"] = "1"
    if distributed.rank() == 1:
        real = grpo_state.RunState.elapsed
        grpo_state.RunState.elapsed = lambda self: real(self) + AHEAD_S
    cfg = pins.grpo_config(tmp / "base", "pinrewards:spread")
    summary = grpo.run(cfg.model_copy(update={"max_minutes": 30.0}), tmp / "run")
    Path(tmp, f"steps{distributed.rank()}").write_text(str(summary["steps"]))


def test_grpo_ranks_whose_clocks_differ_stop_after_the_same_step(tmp_path):
    """Rank 1's clock is past max_minutes after step 1, rank 0's is not: both stop there
    (a rank that stopped alone would leave the other waiting in the next step's gather)."""
    import test_recipe_pins as pins

    pins.micro_model_dir(tmp_path / "base")
    (tmp_path / "pinrewards.py").write_text(pins.REWARDS_MODULE)
    spawn(_grpo_clock_worker, tmp_path)
    assert [(tmp_path / f"steps{r}").read_text() for r in range(WORLD)] == ["1", "1"]
    assert (tmp_path / "run" / "DONE").exists()


def _sft_clock_worker(tmp: Path) -> None:
    import test_recipe_pins as pins

    from r1lab.stages import sft, supervised

    os.environ["R1LAB_NO_PROGRESS"] = "1"
    if distributed.rank() == 1:

        class Ahead(supervised.Clock):
            def elapsed(self) -> float:
                return super().elapsed() + AHEAD_S

        supervised.Clock = Ahead
    cfg = pins.sft_config(tmp / "base", tmp / "sft.jsonl")
    summary = sft.run(cfg.model_copy(update={"max_minutes": 30.0}), tmp / "run")
    Path(tmp, f"steps{distributed.rank()}").write_text(
        f"{summary['steps']} {summary['stopped_by']}"
    )


def test_supervised_ranks_whose_clocks_differ_stop_together(tmp_path):
    """The supervised loop on 2 ranks, rank 1's clock past max_minutes from the start: no
    rank trains a step the other does not (both stop before the first)."""
    import test_recipe_pins as pins

    pins.micro_model_dir(tmp_path / "base")
    pins.write_jsonl(tmp_path / "sft.jsonl", pins.worked_examples(80))
    spawn(_sft_clock_worker, tmp_path)
    stopped = [(tmp_path / f"steps{r}").read_text() for r in range(WORLD)]
    assert stopped == ["0 max_minutes", "0 max_minutes"]


LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


def lora_sft_config(tmp: Path):
    import test_recipe_pins as pins

    from r1lab.config import build_config
    from r1lab.stages import sft

    cfg = pins.sft_config(tmp / "base", tmp / "sft.jsonl").model_dump()
    cfg.update(lora=LORA, lr=2e-2)
    return build_config(sft.Config, cfg)


def _lora_sft_worker(tmp: Path) -> None:
    from r1lab.stages import sft

    os.environ["R1LAB_NO_PROGRESS"] = "1"
    note_mark_done(sft, tmp)
    sft.run(lora_sft_config(tmp), tmp / "run2")


def test_lora_sft_on_two_ranks_matches_one_process(tmp_path, monkeypatch):
    """LoRA SFT under torchrun: each rank holds the base and adapters whole, trains on its
    share of the rows, and the adapters' gradients are summed over ranks: the one-process
    losses and adapters, with rank 0 alone writing the run dir."""
    import test_recipe_pins as pins
    from safetensors.torch import load_file

    from r1lab.stages import sft

    pins.micro_model_dir(tmp_path / "base")
    pins.write_jsonl(tmp_path / "sft.jsonl", pins.worked_examples(80))
    spawn(_lora_sft_worker, tmp_path)
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    sft.run(lora_sft_config(tmp_path), tmp_path / "run1")
    one, two = (pins.logged(tmp_path / run, "loss") for run in ("run1", "run2"))
    assert len(one) == len(two) > 1 and one[0] != one[-1]
    assert two == pytest.approx(one, abs=1e-5)
    assert sorted(p.name for p in tmp_path.glob("marked*")) == ["marked0"]
    a, b = (
        load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("run2", "run1")
    )
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
