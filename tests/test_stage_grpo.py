"""`r1lab grpo` end to end on a micro model: metrics, resume, rewards that cannot judge."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from r1lab.config import ConfigError, build_config
from r1lab.engine import grpo_update
from r1lab.model.checkpoint import load_model
from r1lab.model.tokenizer import SYSTEM, USER
from r1lab.stages import evaluate, grpo, judging
from r1lab.training import read_jsonl

# Every per-step metric name DESIGN.md promises.
DESIGN_METRICS = (
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/clipped_ratio",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "grad_norm",
    "learning_rate",
    "step_time",
    "rollout_time",
    "train_time",
    "rollout/tokens_per_s",
    "train/tokens_per_s",
)


def small(micro_dir, **overrides) -> grpo.Config:
    settings = dict(
        model=str(micro_dir),
        steps=3,
        questions_per_step=2,
        group_size=4,
        max_new_tokens=12,
        eval_n=3,
        eval_k=1,
        warmup_steps=0,
        lr=1e-3,
        save_every=1,
        log_samples=1,
    )
    return build_config(grpo.Config, {**settings, **overrides})


def test_run_writes_every_design_metric(micro_dir, rewards_module, tmp_path):
    cfg = small(
        micro_dir, beta=0.04, rewards={"accuracy": 1, "format": 1, f"{rewards_module}:spread": 1}
    )
    summary = grpo.run(cfg, tmp_path / "run")

    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        missing = [k for k in DESIGN_METRICS if k not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        for name in ("accuracy", "format", "spread"):
            assert f"rewards/{name}/mean" in record
    assert steps[0]["kl"] == 0.0  # the reference is the starting policy
    assert steps[-1]["kl"] > 0 and steps[-1]["grad_norm"] > 0
    assert records[0]["step"] == 0 and "eval/pass@1" in records[0]  # before any update
    assert "eval/pass@1" in steps[-1]
    assert steps[0]["rollout/logprob_diff"] < 1e-4  # sampler and training agree

    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2, 3]
    done = json.loads((tmp_path / "run" / "DONE").read_text())
    assert done["pass@1_before"] == summary["pass@1_before"]
    assert "pass@1_after" in done
    assert load_model(tmp_path / "run" / "model").num_parameters() > 0


class Killed(Exception):
    pass


def run_killed_after_checkpoint(cfg, out, step: int, monkeypatch) -> None:
    """Run the stage until the checkpoint of `step` is on disk, then stop it there as a
    kill would (nothing after the write runs); the stage is left as it was."""
    real_save = grpo.save_checkpoint

    def save_then_die(out_dir, snapshot, model, tokenizer, at, *args):
        real_save(out_dir, snapshot, model, tokenizer, at, *args)
        if at == step:
            raise Killed

    monkeypatch.setattr(grpo, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        grpo.run(cfg, out)
    monkeypatch.setattr(grpo, "save_checkpoint", real_save)


def test_killed_run_resumes_where_it_saved(micro_dir, rewards_module, tmp_path, monkeypatch):
    cfg = small(
        micro_dir, steps=4, save_every=2, beta=0.04, rewards={f"{rewards_module}:spread": 1}
    )
    grpo.run(cfg, tmp_path / "whole")

    real_save = grpo.save_checkpoint

    def save_then_die(out, snapshot, model, tokenizer, step, *args):
        real_save(out, snapshot, model, tokenizer, step, *args)
        if step == 2:
            raise Killed

    monkeypatch.setattr(grpo, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        grpo.run(cfg, tmp_path / "killed")
    assert not (tmp_path / "killed" / "DONE").exists()
    monkeypatch.setattr(grpo, "save_checkpoint", real_save)
    started = []
    monkeypatch.setattr(
        grpo, "train_step", lambda rs, c, step: started.append(step) or train_step(rs, c, step)
    )
    grpo.run(cfg, tmp_path / "killed")

    assert started == [3, 4]
    assert (tmp_path / "killed" / "DONE").exists()
    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert a.get("reward") == b.get("reward") and a.get("eval/pass@1") == b.get("eval/pass@1")
    # Same rollouts, same updates: the resumed run ends with the uninterrupted run's weights.
    a = load_model(tmp_path / "whole" / "model").state_dict()
    b = load_model(tmp_path / "killed" / "model").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_a_refreshed_reference_survives_a_kill(micro_dir, rewards_module, tmp_path, monkeypatch):
    """The reference refreshed at step 3 is in step 3's checkpoint; step 4 uses it again."""
    cfg = small(
        micro_dir,
        steps=4,
        save_every=3,
        beta=0.04,
        ref_refresh_every=2,
        rewards={f"{rewards_module}:spread": 1},
    )
    grpo.run(cfg, tmp_path / "whole")
    run_killed_after_checkpoint(cfg, tmp_path / "killed", 3, monkeypatch)
    state = torch.load(tmp_path / "killed" / "state" / "optimizer.pt", weights_only=True)
    assert set(state) == {"policy", "optimizer", "ref"} and state["ref"] is not None
    grpo.run(cfg, tmp_path / "killed")

    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r.get("kl") for r in whole] == [r.get("kl") for r in resumed]


train_step = grpo.train_step


def test_rewards_that_judge_nothing_stop_the_run(micro_dir, rewards_module, tmp_path):
    cfg = small(micro_dir, rewards={f"{rewards_module}:never": 1})
    with pytest.raises(RuntimeError, match="no completion could be judged"):
        grpo.run(cfg, tmp_path / "run")


def test_zero_variance_warning(micro_dir, rewards_module, tmp_path, capsys):
    cfg = small(micro_dir, steps=1, rewards={f"{rewards_module}:constant": 1})
    grpo.run(cfg, tmp_path / "run")
    err = " ".join(capsys.readouterr().err.split())
    assert "100% of the groups have zero reward variance" in err
    record = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r][0]
    assert record["frac_reward_zero_std"] == 1.0 and record["reward"] == 1.0


def test_nan_loss_skips_then_stops(micro_dir, rewards_module, tmp_path, monkeypatch):
    real_loss = grpo_update.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * math.nan, stats

    monkeypatch.setattr(grpo_update, "policy_loss", nan_loss)
    cfg = small(micro_dir, steps=5, max_nan_steps=2, rewards={f"{rewards_module}:spread": 1})
    before = {k: v.clone() for k, v in load_model(micro_dir).state_dict().items()}
    with pytest.raises(grpo.NonFiniteLossError, match="2 steps in a row"):
        grpo.run(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert [r["skipped_updates"] for r in records] == [1, 1]
    after = load_model(tmp_path / "run" / "model").state_dict()  # saved after step 1
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="group_size"):
        build_config(grpo.Config, {"model": "m", "group_size": 1})
    with pytest.raises(ConfigError, match="aggregation"):
        build_config(grpo.Config, {"model": "m", "aggregation": "sum"})
    with pytest.raises(ConfigError, match="mini_batches"):
        build_config(
            grpo.Config, {"model": "m", "questions_per_step": 2, "group_size": 2, "mini_batches": 5}
        )
    cfg = build_config(
        grpo.Config, {"tasks": {"chain_sum": 3, "arithmetic": 1}, "rewards": {"accuracy": 2}}
    )
    assert [(t.name, t.weight) for t in cfg.tasks] == [("chain_sum", 3), ("arithmetic", 1)]
    assert cfg.rewards["accuracy"].weight == 2


def test_bad_templates_name_the_field_and_the_choices():
    for field in ("template", "eval_template"):
        with pytest.raises(
            ConfigError, match=f"field '{field}'.*chatml.*r1-zero.*chat.*r1-distill"
        ):
            build_config(grpo.Config, {"model": "m", field: "chatml"})
    with pytest.raises(ConfigError, match="field 'template'.*not found: missing.yaml"):
        build_config(grpo.Config, {"model": "m", "template": "missing.yaml"})


def test_rewards_follow_the_template(tmp_path):
    """The format reward checks, and accuracy reads the answer where, the template asks:
    the tokenizer's chat template (chat, r1-distill) as r1-chat, a file by its base."""
    (tmp_path / "zero.yaml").write_text("base: r1-zero\nsystem: Be exact.\n")
    expected = {
        "r1-zero": ("r1-zero", "r1-zero"),
        "r1-chat": ("r1-chat", "r1-chat"),
        "plain": ("r1-zero", None),  # no structure asked: format's own default, no hint
        "chat": ("r1-chat", "r1-chat"),
        "r1-distill": ("r1-chat", "r1-chat"),
        str(tmp_path / "zero.yaml"): ("r1-zero", "r1-zero"),
    }
    for template, (structure, hint) in expected.items():
        cfg = build_config(grpo.Config, {"model": "m", "template": template})
        (accuracy, _), (fmt, _) = grpo.reward_sets(cfg)[0].items
        assert (fmt.structure, accuracy.fn.template_hint) == (structure, hint), template


def test_chat_template_prompts_are_the_eval_stages(micro_dir, tmp_path, monkeypatch):
    """template=chat with a system prompt and an instruction: the rollouts (samples.jsonl)
    and the held-out evaluation ask exactly as `r1lab eval` asks with the same settings."""
    prompting = dict(template="chat", system_prompt="Be exact.", instruction="Sum them.")
    asked: list[list[str]] = []
    render = judging.render_prompts
    monkeypatch.setattr(judging, "render_prompts", lambda *a: asked.append(render(*a)) or asked[-1])
    grpo.run(small(micro_dir, steps=2, **prompting), tmp_path / "run")
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2]
    for s in samples:
        assert s["prompt"].startswith(f"{SYSTEM}Be exact.{USER}{s['question']}\nSum them.")
    held_out, *rollouts, final = asked
    assert [s["prompt"] for s in samples] == [r[0] for r in rollouts]
    assert final == held_out

    def eval_prompts(tasks: list, out: str) -> dict[str, str]:
        settings = dict(model=str(tmp_path / "run"), tasks=tasks, k=1, max_new_tokens=2)
        evaluate.run(build_config(evaluate.Config, {**settings, **prompting}), tmp_path / out)
        return {s["question"]: s["prompt"] for s in read_jsonl(tmp_path / out / "samples.jsonl")}

    asked_in_training = tmp_path / "asked.jsonl"
    asked_in_training.write_text(
        "".join(
            json.dumps({"question": s["question"], "answer": s["answer"]}) + "\n" for s in samples
        )
    )
    trained = eval_prompts([{"name": "jsonl", "path": str(asked_in_training)}], "eval-train")
    assert {s["question"]: s["prompt"] for s in samples} == trained
    evaluated = eval_prompts([{"name": "chain_sum", "n": 3}], "eval-held-out")
    assert list(evaluated.values()) == held_out


def test_chat_template_needs_a_tokenizer_that_has_one(micro_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(micro_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="template 'chat'.*this tokenizer has none"):
        grpo.run(small(bare, template="chat", eval_template="plain"), tmp_path / "a")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # said before any sampling


def test_unknown_reward_and_missing_model_are_config_errors(micro_dir, tmp_path):
    with pytest.raises(ConfigError, match="model"):
        grpo.run(grpo.Config(), tmp_path / "a")
    with pytest.raises(ConfigError, match="rewards"):
        grpo.run(small(micro_dir, rewards={"acuracy": 1}), tmp_path / "b")


def test_dapo_style_options_run(micro_dir, rewards_module, tmp_path):
    """Dynamic sampling, overlong penalty, truncation masking, several mini-batches and epochs."""
    cfg = small(
        micro_dir,
        steps=2,
        rewards={f"{rewards_module}:spread": 1},
        dynamic_sampling=True,
        max_resample=1,
        overlong_buffer=4,
        mask_truncated=True,
        mini_batches=2,
        mu=2,
        micro_batch_size=3,
        eps_high=0.28,
        aggregation="token-mean",
    )
    grpo.run(cfg, tmp_path / "run")
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert len(steps) == 2
    for record in steps:
        assert "rewards/overlong_penalty/mean" in record
        assert 1 <= record["dynamic_sampling/rounds"] <= 2
        assert record["dynamic_sampling/kept_groups"] <= 2


def test_training_pool_never_holds_an_eval_question():
    from r1lab.stages.rollout import TaskMixture, question_key
    from r1lab.tasks import get_task

    spec = grpo.TaskSpec(name="chain_sum")
    train = get_task("chain_sum").examples("train", n=50, seed=0)
    exclude = {question_key(ex.question) for ex in train[:10]}
    mixture = TaskMixture([spec], pool_size=50, seed=0, exclude=exclude)
    assert mixture.removed >= 10
    drawn = mixture.draw(40, step=1)
    assert len(drawn) == 40
    assert not any(question_key(ex.question) in exclude for _, ex in drawn)
    assert drawn == mixture.draw(40, step=1)  # the same step draws the same questions


def test_one_task_spec_for_both_preset_shapes_and_a_users_file(tmp_path):
    from r1lab.stages.evaluate import Config as EvalConfig
    from r1lab.stages.task_spec import TaskSpec

    nested = TaskSpec.model_validate({"name": "chain_sum", "options": {"zh_fraction": 0.3}})
    spread = TaskSpec.model_validate({"name": "chain_sum", "zh_fraction": 0.3})
    assert nested == spread and spread.options == {"zh_fraction": 0.3}
    # GRPO's saved config keeps its shape, so runs saved before still resume
    assert nested.model_dump() == {
        "name": "chain_sum",
        "weight": 1.0,
        "options": {"zh_fraction": 0.3},
    }
    cfg = build_config(
        grpo.Config, {"tasks": [{"name": "math500", "path": str(tmp_path / "q.jsonl")}]}
    )
    assert cfg.tasks[0].options == {"path": str(tmp_path / "q.jsonl")}
    assert grpo.TaskSpec is TaskSpec
    ev = build_config(EvalConfig, {"model": "m", "tasks": [{"name": "chain_sum", "label": "x"}]})
    assert ev.tasks == [{"name": "chain_sum", "label": "x"}]
    with pytest.raises(ValueError, match="both inside and outside"):
        TaskSpec.model_validate(
            {"name": "chain_sum", "zh_fraction": 0.1, "options": {"zh_fraction": 0.2}}
        )
