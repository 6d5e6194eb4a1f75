"""Recipe tests with pinned values: the first steps of each training stage, to 1e-5.

Micro-sized pretrain, SFT, GRPO and reward-model runs on the CPU in fp32, one thread. Each
pins the loss of its first steps (GRPO also its KL and reward), and the runs that can resume
are killed after a checkpoint, resumed, and held to the same numbers. They guard
refactoring: a change that moves any of these numbers changed what the stage computes.

The SFT, GRPO and reward-model runs use a tokenizer and data built here from fixed text, so
they depend on the stage code only (GRPO draws its questions from the chain_sum task). The
pretraining run builds its corpus from `r1lab.tasks.corpus.pretrain_documents`, so its
pins move whenever the corpus changes. To regenerate them after such a change, print fresh
values and paste them into the pin block below:

    python tests/test_recipe_pins.py
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import save_random_micro_model

from r1lab.model.tokenizer import r1_chat_prompt
from r1lab.training import MetricsLog

TOLERANCE = 1e-5  # relative to the pinned value (see assert_pinned)
KILL_AFTER = 2  # each resumable run is killed once the checkpoint of this step is written
STEPS = 2 * KILL_AFTER

# ---- pinned values ---------------------------------------------------------------------------
# PRETRAIN_LOSS depends on the procedural pretraining corpus; regenerate with the command in
# the module docstring when the corpus changes.
PRETRAIN_LOSS = [5.769668102264404, 5.577761173248291, 5.352724552154541, 5.347564220428467]
SFT_LOSS = [5.646604537963867, 5.538744926452637, 5.354935169219971, 5.212935924530029]
GRPO_LOSS = [
    -3.725290298461914e-09,
    3.2782554626464844e-06,
    9.08970832824707e-06,
    1.849234104156494e-05,
]
GRPO_KL = [0.0, 8.179247379302979e-05, 0.00022699932742398232, 0.00046305483556352556]
GRPO_REWARD = [0.4375, 0.9375, 0.5, 0.53125]
REWARD_MODEL_LOSS = [0.680121123790741, 0.6959060430526733, 0.6865072846412659, 0.724612295627594]

REWARDS_MODULE = '''
def spread(prompts, completions, **columns):
    """Varies with the completion, so groups have a spread and the update has a gradient."""
    return [(len(c) % 5) / 4 for c in completions]
'''


class Killed(Exception):
    """Stands in for the process dying right after a checkpoint."""


# ---- fixed data ----------------------------------------------------------------------------
def worked_examples(n: int, seed: int = 0) -> list[dict]:
    """Chat-format sums with a short chain of thought; fixed text, no task generator."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 60) for _ in range(3))
        rows.append(
            {
                "prompt": r1_chat_prompt(f"What is {a}+{b}+{c}?"),
                "response": f"<think>\n{a}+{b}={a + b}\n{a + b}+{c}={a + b + c}\n</think>\n"
                f"The answer is \\boxed{{{a + b + c}}}.",
                "answer": str(a + b + c),
            }
        )
    return rows


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """A clear, correct summary preferred over a wrong one."""
    pairs = []
    for row in worked_examples(n, seed):
        thought = row["response"].rsplit("</think>", 1)[0] + "</think>\n"
        wrong = int(row["answer"]) + 1
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": row["response"],
                "rejected": thought + f"The answer is \\boxed{{{wrong}}}.",
            }
        )
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def micro_model_dir(folder: Path, size: str = "micro") -> Path:
    """A seeded decoder (micro by default) with a BPE tokenizer trained on the fixed examples."""
    texts = [r["prompt"] + r["response"] for r in worked_examples(200, seed=1)]
    return save_random_micro_model(folder, vocab_size=300, texts=texts, size=size)


# ---- the runs ----------------------------------------------------------------------------------
def pretrain_config():
    from r1lab.stages import pretrain

    return pretrain.Config(
        size="micro",
        n_documents=120,
        val_documents=10,
        vocab_size=300,
        seq_len=64,
        batch_size=4,
        lr=5e-3,
        warmup_steps=1,
        max_steps=STEPS,
        max_minutes=None,
        log_every=KILL_AFTER,
        eval_every=KILL_AFTER,
        save_every=KILL_AFTER,
        dtype="float32",
        device="cpu",
    )


def sft_config(base: Path, data: Path):
    from r1lab.stages import sft

    return sft.Config(
        model=str(base),
        data=[str(data)],
        val_examples=4,
        seq_len=128,
        batch_size=4,
        epochs=1,
        max_steps=STEPS,
        lr=3e-3,
        warmup_steps=1,
        log_every=KILL_AFTER,
        eval_every=KILL_AFTER,
        save_every=KILL_AFTER,
        dtype="float32",
        device="cpu",
    )


def grpo_config(base: Path, reward: str):
    from r1lab.config import build_config
    from r1lab.stages import grpo

    settings = dict(
        model=str(base),
        steps=STEPS,
        questions_per_step=2,
        group_size=4,
        max_new_tokens=12,
        eval_n=2,
        eval_k=1,
        eval_every=0,
        warmup_steps=0,
        lr=1e-3,
        beta=0.04,
        save_every=KILL_AFTER,
        log_samples=0,
        rewards={reward: 1},
        dtype="float32",
        device="cpu",
    )
    return build_config(grpo.Config, settings)


def reward_model_config(base: Path, data: Path):
    from r1lab.stages import reward_model

    return reward_model.Config(
        model=str(base),
        data=[str(data)],
        n_pairs=40,
        batch_size=8,
        epochs=1,
        lr=3e-3,
        warmup_steps=1,
        max_length=64,
        save_every=KILL_AFTER,
        dtype="float32",
        device="cpu",
    )


def logged(out: Path, key: str) -> list[float]:
    """One value per training step (records with a `loss` carry the step's numbers)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r[key] for r in records if "loss" in r and r.get("step", 0) >= 1]


def killed_after(step: int):
    """A MetricsLog.write that dies when the record of `step` + 1 is about to be logged.

    Every stage logs a step before it saves that step, so the last checkpoint on disk is then
    the one of `step`: the resume starts from it and replays the rest.
    """
    real_write = MetricsLog.write

    def write(self, record: dict) -> None:
        if record.get("step") == step + 1 and "loss" in record:
            raise Killed
        real_write(self, record)

    return write


def run_killed_and_resumed(run, cfg, out: Path, monkeypatch) -> dict:
    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "write", killed_after(KILL_AFTER))
        with pytest.raises(Killed):
            run(cfg, out)
    assert not (out / "DONE").exists()
    assert json.loads((out / "state" / "trainer_state.json").read_text())["step"] == KILL_AFTER
    return run(cfg, out)


def assert_pinned(values: list[float], pinned: list[float], name: str) -> None:
    assert len(values) == len(pinned), f"{name}: {len(values)} steps logged, {len(pinned)} pinned"
    for step, (got, want) in enumerate(zip(values, pinned), 1):
        # Relative, with a floor: GRPO's loss is ~1e-6 (advantages sum to zero per group).
        limit = TOLERANCE * max(abs(want), 1e-3)
        assert abs(got - want) <= limit, f"{name} at step {step}: {got!r} != pinned {want!r}"


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Pinned numbers hold for one intra-op thread (the reduction order is then fixed)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return micro_model_dir(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture
def reward_name(tmp_path, monkeypatch) -> str:
    (tmp_path / "pinrewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pinrewards:spread"


# ---- the tests -------------------------------------------------------------------------------
def test_pretrain_losses_are_pinned_and_survive_a_kill(tmp_path, monkeypatch):
    from r1lab.stages import pretrain

    cfg = pretrain_config()
    pretrain.run(cfg, tmp_path / "straight")
    assert_pinned(logged(tmp_path / "straight", "loss"), PRETRAIN_LOSS, "pretrain loss")

    summary = run_killed_and_resumed(pretrain.run, cfg, tmp_path / "killed", monkeypatch)
    assert summary["resumed_from"] == KILL_AFTER
    assert_pinned(logged(tmp_path / "killed", "loss"), PRETRAIN_LOSS, "resumed pretrain loss")


def test_sft_losses_are_pinned_and_survive_a_kill(base, tmp_path, monkeypatch):
    from r1lab.stages import sft

    data = write_jsonl(tmp_path / "sft.jsonl", worked_examples(80))
    cfg = sft_config(base, data)
    sft.run(cfg, tmp_path / "straight")
    assert_pinned(logged(tmp_path / "straight", "loss"), SFT_LOSS, "sft loss")

    summary = run_killed_and_resumed(sft.run, cfg, tmp_path / "killed", monkeypatch)
    assert summary["resumed_from"] == KILL_AFTER
    assert_pinned(logged(tmp_path / "killed", "loss"), SFT_LOSS, "resumed sft loss")


def test_grpo_loss_kl_and_reward_are_pinned_and_survive_a_kill(
    base, reward_name, tmp_path, monkeypatch
):
    from r1lab.stages import grpo

    cfg = grpo_config(base, reward_name)
    grpo.run(cfg, tmp_path / "straight")
    resumed = tmp_path / "killed"
    run_killed_and_resumed(grpo.run, cfg, resumed, monkeypatch)
    for out in (tmp_path / "straight", resumed):
        assert_pinned(logged(out, "loss"), GRPO_LOSS, f"grpo loss ({out.name})")
        assert_pinned(logged(out, "kl"), GRPO_KL, f"grpo kl ({out.name})")
        assert_pinned(logged(out, "reward"), GRPO_REWARD, f"grpo reward ({out.name})")


def test_reward_model_losses_are_pinned_and_survive_a_kill(base, tmp_path, monkeypatch):
    from r1lab.stages import reward_model

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(40))
    cfg = reward_model_config(base, data)
    reward_model.run(cfg, tmp_path / "rm")
    assert_pinned(logged(tmp_path / "rm", "loss")[:4], REWARD_MODEL_LOSS, "reward-model loss")

    summary = run_killed_and_resumed(reward_model.run, cfg, tmp_path / "killed", monkeypatch)
    assert summary["steps"] == 5  # 36 training pairs in batches of 8
    resumed = logged(tmp_path / "killed", "loss")
    assert_pinned(resumed[:4], REWARD_MODEL_LOSS, "resumed reward-model loss")
    assert_pinned(resumed, logged(tmp_path / "rm", "loss"), "resumed reward-model loss")


# ---- regeneration ----------------------------------------------------------------------------
def fresh_values(folder: Path) -> dict[str, list[float]]:
    """Every pinned series computed anew (uninterrupted runs) under `folder`."""
    import sys

    from r1lab.stages import grpo, pretrain, reward_model, sft

    torch.set_num_threads(1)
    base = micro_model_dir(folder / "base" / "model")
    (folder / "pinrewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    sys.path.insert(0, str(folder))
    pretrain.run(pretrain_config(), folder / "pretrain")
    sft.run(
        sft_config(base, write_jsonl(folder / "sft.jsonl", worked_examples(80))), folder / "sft"
    )
    grpo.run(grpo_config(base, "pinrewards:spread"), folder / "grpo")
    pairs = write_jsonl(folder / "pairs.jsonl", preference_pairs(40))
    reward_model.run(reward_model_config(base, pairs), folder / "rm")
    return {
        "PRETRAIN_LOSS": logged(folder / "pretrain", "loss"),
        "SFT_LOSS": logged(folder / "sft", "loss"),
        "GRPO_LOSS": logged(folder / "grpo", "loss"),
        "GRPO_KL": logged(folder / "grpo", "kl"),
        "GRPO_REWARD": logged(folder / "grpo", "reward"),
        "REWARD_MODEL_LOSS": logged(folder / "rm", "loss")[:4],
    }


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("R1LAB_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        for name, values in fresh_values(Path(tmp)).items():
            print(f"{name} = [{', '.join(repr(float(v)) for v in values)}]")
